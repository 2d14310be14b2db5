"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv 1708.07747) from the IDX files of Debian's
``dataset-fashion-mnist`` package: 60k train + 10k test grey 28 x 28 images, 10 classes, MIT/Expat licence.

Install: ``apt-get install -y dataset-fashion-mnist`` (files land in /usr/share/datasets/fashion-mnist/), or
``apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR`` and pass
``root=DIR/usr/share/datasets/fashion-mnist`` (or set ``LMLAB_FASHION_MNIST``). The IDX format is parsed here
(big-endian magic 0x0000080N, dims, then uint8 data), with or without ``.gz``.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmlab.errors import ConfigError, DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixel mean/std (in [0, 1])


@dataclass
class ImageSplit:
    images: Tensor  # (N, 1, 28, 28) float32, standardised with MEAN/STD
    labels: Tensor  # (N,) long

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FashionMNIST:
    train: ImageSplit
    val: ImageSplit  # held out from the official train split (empty when val_size = 0)
    test: ImageSplit


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) of unsigned bytes into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header needs {4 + 4 * ndim} bytes, the file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {body.size} bytes but its header says {dims}: the file is truncated")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: run `{INSTALL}` "
                    f"(or point --data / LMLAB_FASHION_MNIST at a folder holding the IDX files)")


def load_split(split: str, root: str | os.PathLike | None = None) -> ImageSplit:
    """'train' or 'test' as standardised float images and labels."""
    if split not in FILES:
        raise DataError(f"unknown split {split!r}; choose train or test")
    root = Path(root or os.environ.get("LMLAB_FASHION_MNIST") or DEFAULT_ROOT)
    images_file, labels_file = (_find(root, stem) for stem in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_file} / {labels_file}: expected (N, H, W) images and N labels, "
                        f"got {images.shape} and {labels.shape}")
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    return ImageSplit(images=x.unsqueeze(1), labels=torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(root: str | os.PathLike | None = None, *, val_size: int = 5000, seed: int = 0,
                       train_size: int | None = None) -> FashionMNIST:
    """Train / validation / test; validation is a seeded random hold-out of ``val_size`` train images.

    ``train_size`` caps the remaining training images (a seeded subset), for quick runs.
    """
    full = load_split("train", root)
    test = load_split("test", root)
    if not 0 <= val_size < len(full):
        raise DataError(f"val_size must be in [0, {len(full)}), got {val_size}")
    if train_size is not None and train_size < 1:
        raise DataError(f"train_size must be >= 1 (or None: every image not held out), got {train_size}")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    return FashionMNIST(
        train=ImageSplit(full.images[train_idx], full.labels[train_idx]),
        val=ImageSplit(full.images[val_idx], full.labels[val_idx]),
        test=test,
    )


@functools.lru_cache(maxsize=4)
def cached_fashion_mnist(root: str | None, val_size: int = 5000, train_size: int | None = None):
    """:func:`load_fashion_mnist` (seed 0) loaded once per process: recipes run many trainings per worker."""
    return load_fashion_mnist(root, val_size=val_size, seed=0, train_size=train_size)


def prepare_recipe_data(root: str | None, val_size: int, train_size: int | None, *, workers: int,
                        threads: int) -> None:
    """A recipe's start: check ``workers``, set torch's threads (one per worker when there are several) and
    load Fashion-MNIST once, so a missing dataset fails here with the install command, before any worker."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    torch.set_num_threads(threads if workers == 1 else 1)
    cached_fashion_mnist(root, val_size, train_size)
    if workers > 1:
        cached_fashion_mnist.cache_clear()  # each worker process loads its own copy
