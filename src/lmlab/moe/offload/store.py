"""The slow tier: every expert's weights in their own tensors of one memory-mapped safetensors file.

Shapes: L blocks, E experts per block, D width, H expert hidden width. Tensor names are
``layers.{l}.experts.{e}.{w1,b1,w2,b2}`` with w1 (D, H), b1 (H,), w2 (H, D), b2 (D,) (the layout of
:class:`lmlab.moe.experts.Experts`, one expert's slice each), so one expert is four byte ranges of the file.

:func:`save_expert_store` writes the file (safetensors' own writer, temporary name renamed into place) with a
fingerprint of the source experts' weights in its metadata (:func:`expert_fingerprint`), so a store written from
another model of the same shape is told apart from this model's;
:class:`ExpertStore` parses the safetensors header itself (8-byte little-endian length + JSON, the format's
spec) to know each tensor's byte range, checks the file is complete, and offers two ways to read an expert:
zero-copy views of a memory map (:meth:`ExpertStore.view`) and ``pread`` into a caller's buffer
(:meth:`ExpertStore.pread_into`, used by the disk tier, which evicts the range from the page cache first).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import DataError, ManifestMismatchError

FORMAT = "lmlab-expert-store/1"
PARTS = ("w1", "b1", "w2", "b2")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def tensor_name(layer: int, expert: int, part: str) -> str:
    return f"layers.{layer}.experts.{expert}.{part}"


def expert_fingerprint(model) -> str:
    """sha256 over every expert tensor's name, dtype, shape and bytes, in store order: two models of one shape
    (another seed, more training, another dtype) get different fingerprints. Cached on the model while none of
    its expert tensors changes (same storage, same in-place version counter), since hashing large experts takes
    seconds."""
    banks = [(li, part, getattr(blk.experts, part)) for li, blk in enumerate(model.layers) for part in PARTS
             if getattr(blk.experts, part) is not None]
    key = tuple((t.data_ptr(), t._version, t.dtype) for _, _, t in banks)
    cached = getattr(model, "_lmlab_expert_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for li, part, bank in banks:
        t = bank.detach().cpu().contiguous()
        h.update(f"layers.{li}.experts.{part}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    digest = h.hexdigest()
    model._lmlab_expert_fingerprint = (key, digest)
    return digest


def save_expert_store(model, path: str | os.PathLike) -> Path:
    """Write every expert of a :class:`~lmlab.moe.pregated.PreGatedMoEForCausalLM` to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for li, blk in enumerate(model.layers):
        ex = blk.experts
        if ex.b1 is None:
            raise ManifestMismatchError("the expert store needs experts with biases (Experts(bias=True))")
        for e in range(ex.num_experts):
            for part in PARTS:
                tensors[tensor_name(li, e, part)] = getattr(ex, part)[e].detach().cpu().contiguous().clone()
    ex = model.layers[0].experts
    meta = {"format": FORMAT, "num_layers": str(len(model.layers)), "num_experts": str(ex.num_experts),
            "dim": str(ex.dim), "hidden": str(ex.hidden), "activation": ex.activation,
            "fingerprint": expert_fingerprint(model)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class TensorRange:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class ExpertStore:
    """A memory-mapped expert file; ``store.view(l, e)`` gives that expert's tensors without copying."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "does not exist"
            raise DataError(f"expert store {self.path} {what}: write one with "
                            "lmlab.moe.offload.save_expert_store(model, path)")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataError(f"expert store {self.path} is truncated ({size} bytes): rewrite it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise DataError(f"expert store {self.path} is truncated or not safetensors (header of {n} bytes, "
                                f"file of {size}): rewrite it with save_expert_store")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"expert store {self.path} has a corrupt header: rewrite it") from None
        meta = header.pop("__metadata__", {}) or {}
        if meta.get("format") != FORMAT:
            raise DataError(f"{self.path} is not an lmlab expert store (format {meta.get('format')!r})")
        self.num_layers, self.num_experts = int(meta["num_layers"]), int(meta["num_experts"])
        self.dim, self.hidden, self.activation = int(meta["dim"]), int(meta["hidden"]), meta["activation"]
        self.fingerprint: str | None = meta.get("fingerprint")  # None: written before fingerprints (unknown source)
        base = 8 + n
        self.ranges: dict[str, TensorRange] = {}
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            self.ranges[name] = TensorRange(_DTYPES[info["dtype"]], tuple(info["shape"]), base + lo, base + hi)
        end = max((r.end for r in self.ranges.values()), default=base)
        if end > size:
            raise DataError(f"expert store {self.path} is truncated ({size} bytes, its header needs {end}): "
                            "rewrite it with save_expert_store")
        for li in range(self.num_layers):
            for e in range(self.num_experts):
                for part in PARTS:
                    if tensor_name(li, e, part) not in self.ranges:
                        raise DataError(f"expert store {self.path} lacks {tensor_name(li, e, part)}: rewrite it")
        first = [self.ranges[tensor_name(0, 0, p)] for p in PARTS]
        self.dtype = first[0].dtype
        self.expert_bytes = sum(r.nbytes for r in first)
        # safetensors lays an expert's four tensors out back to back (names sort together): one byte span per
        # expert, the same inner layout for all, so a load is one copy (one pread, one DMA) per expert
        base0 = min(r.start for r in first)
        self.layout = [((r.start - base0) // r.dtype.itemsize, r.shape) for r in first]  # per part: offset, shape
        self.spans: dict[tuple[int, int], int] = {}  # (layer, expert) -> first byte
        for li in range(self.num_layers):
            for e in range(self.num_experts):
                rs = self.expert_ranges(li, e)
                lo = min(r.start for r in rs)
                if (max(r.end for r in rs) - lo != self.expert_bytes or any(r.dtype != self.dtype for r in rs)
                        or [(r.start - lo) // r.dtype.itemsize for r in rs] != [o for o, _ in self.layout]):
                    raise DataError(f"expert store {self.path}: expert ({li}, {e}) is not one contiguous span in "
                                    "the common layout; rewrite it with save_expert_store")
                self.spans[(li, e)] = lo
        self.expert_numel = self.expert_bytes // self.dtype.itemsize
        self.file_size = size
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)  # private, writable view: no torch warning
        self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)

    def check_model(self, model) -> None:
        """Refuse a store written from a model of another shape, or (when the store has a fingerprint) from other
        weights of the same shape: the engine would silently run the wrong experts. A store without a fingerprint
        (written by an older lmlab) is checked by shape only."""
        c = model.config
        want = (c.num_hidden_layers, c.num_experts, c.hidden_size, c.expert_hidden_size)
        got = (self.num_layers, self.num_experts, self.dim, self.hidden)
        if want != got:
            raise ManifestMismatchError(f"expert store {self.path} has (layers, experts, dim, hidden) = {got}, "
                                        f"the model {want}: write the store from this model")
        if self.matches(model) is False:
            raise ManifestMismatchError(f"expert store {self.path} was written from other expert weights than this "
                                        "model's: write the store from this model (save_expert_store)")

    def matches(self, model) -> bool | None:
        """Whether the store was written from ``model``'s expert weights; None when the store has no fingerprint."""
        return None if self.fingerprint is None else self.fingerprint == expert_fingerprint(model)

    def expert_ranges(self, layer: int, expert: int) -> list[TensorRange]:
        return [self.ranges[tensor_name(layer, expert, p)] for p in PARTS]

    def view(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The expert's (w1, b1, w2, b2) as views of the memory map (reading them faults pages in)."""
        return [self._buf[r.start:r.end].view(r.dtype).view(r.shape) for r in self.expert_ranges(layer, expert)]

    def flat_view(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's whole span as one 1-D tensor (``expert_numel`` values) viewing the memory map."""
        lo = self.spans[(layer, expert)]
        return self._buf[lo:lo + self.expert_bytes].view(self.dtype)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views (w1, b1, w2, b2) of a 1-D span laid out like the file's (or (S, numel) rows: slot views)."""
        out = []
        for off, shape in self.layout:
            n = 1
            for d in shape:
                n *= d
            out.append(flat[..., off:off + n].unflatten(-1, shape))
        return out

    def fileno(self) -> int:
        """The store's open file descriptor (the copy process reads through it: the same file this store checked)."""
        return self._fd

    def evict(self, layer: int, expert: int) -> None:
        """Drop the expert's bytes from the page cache (posix_fadvise DONTNEED), so the next read hits the disk."""
        os.posix_fadvise(self._fd, self.spans[(layer, expert)], self.expert_bytes, os.POSIX_FADV_DONTNEED)

    def pread_into(self, layer: int, expert: int, dst: torch.Tensor) -> int:
        """Read the expert's span with one ``pread`` into a contiguous 1-D CPU tensor; returns bytes read."""
        mv = memoryview(dst.view(torch.uint8).numpy())
        got = os.preadv(self._fd, [mv], self.spans[(layer, expert)])
        if got != self.expert_bytes:
            raise DataError(f"expert store {self.path}: short read ({got} of {self.expert_bytes} bytes); "
                            "is it truncated?")
        return got

    def close(self) -> None:
        if self._mm is not None:
            self._buf = None
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the map goes when it does
                pass
            os.close(self._fd)
            self._mm = None

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
