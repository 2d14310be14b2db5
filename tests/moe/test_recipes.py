"""The MoE recipes' parallel runs (--workers) and the process pool under them (lmlab.moe.train.run_jobs)."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe.train import run_jobs

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"median_step_seconds", "train_seconds"}


def test_run_jobs_keeps_order_and_uses_one_thread_per_worker():
    jobs = [(2.0, 3.0), (3.0, 2.0), (5.0, 1.0)]
    assert run_jobs(math.pow, jobs, workers=2) == [8.0, 9.0, 5.0]
    assert run_jobs(math.pow, jobs, workers=1) == [8.0, 9.0, 5.0]
    assert run_jobs(torch.get_num_threads, [(), ()], workers=2) == [1, 1]
    assert run_jobs(math.pow, [], workers=2) == []
    with pytest.raises(ConfigError, match="workers"):
        run_jobs(math.pow, jobs, workers=0)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory):
    """A tiny synthetic data set in Fashion-MNIST's IDX layout (class = brightness band, plus noise)."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for images, labels, n in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 300),
                              ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 80)):
        y = rng.integers(0, 10, n)
        x = np.clip(y[:, None, None] * 25 + rng.integers(0, 40, (n, 28, 28)), 0, 255)
        write_idx(root / images, x)
        write_idx(root / labels, y)
    return root


TINY = ["--steps", "4", "--batch-size", "16", "--dim", "16", "--depth", "1", "--heads", "2", "--moe-layers", "1",
        "--val-size", "40", "--seeds", "0", "1"]


def run_recipe(name: str, data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--data", str(data), "--out", str(out), *TINY,
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow  # two recipe runs each (about a minute on a loaded 2-core machine)
@pytest.mark.parametrize(("name", "extra"), [
    ("soft_moe", ["--experts", "4", "--lr-grid", "1e-3", "3e-3"]),
    ("ewa", ["--experts", "2", "--beta-grid", "0.1", "0.5"]),
])
def test_recipe_workers_give_the_same_numbers(name, extra, fake_fashion_mnist, tmp_path):
    one = run_recipe(name, fake_fashion_mnist, tmp_path / "one.json", "--workers", "1", *extra)
    two = run_recipe(name, fake_fashion_mnist, tmp_path / "two.json", "--workers", "2", *extra)
    assert without_timing(one["per_seed"]) == without_timing(two["per_seed"])
    assert len(one["per_seed"]) == (8 if name == "soft_moe" else 4)  # 4 kinds x 2 seeds; 2 methods x 2 seeds
    assert one["environment"]["workers"] == 1 and two["environment"]["workers"] == 2
    assert two["wall_seconds"] > 0 and "--workers 2" in two["summary"]["command"]
    key = "lr_tuning" if name == "soft_moe" else "beta_tuning"
    assert one[key] == two[key]


def test_recipe_missing_data_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "ewa.py"), "--data", str(tmp_path), "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "apt-get install -y dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_recipe_data(fake_fashion_mnist, tmp_path):
    from lmlab.errors import DataError
    from lmlab.moe.data import cached_fashion_mnist, prepare_recipe_data

    with pytest.raises(ConfigError, match="--workers"):
        prepare_recipe_data(str(fake_fashion_mnist), 40, None, workers=0, threads=1)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        prepare_recipe_data(str(tmp_path / "none"), 40, None, workers=1, threads=1)
    threads = torch.get_num_threads()
    try:
        prepare_recipe_data(str(fake_fashion_mnist), 40, None, workers=1, threads=1)
        assert cached_fashion_mnist.cache_info().currsize == 1  # loaded once, kept for this process's runs
        assert cached_fashion_mnist(str(fake_fashion_mnist), 40, None) is cached_fashion_mnist(
            str(fake_fashion_mnist), 40, None)
        prepare_recipe_data(str(fake_fashion_mnist), 40, None, workers=2, threads=1)
        assert torch.get_num_threads() == 1 and cached_fashion_mnist.cache_info().currsize == 0
    finally:
        torch.set_num_threads(threads)
        cached_fashion_mnist.cache_clear()


def test_vit_recipe_arguments_defaults_and_overrides():
    import argparse

    from lmlab.moe.train import add_vit_recipe_arguments

    ap = argparse.ArgumentParser()
    add_vit_recipe_arguments(ap, experts=4, out="results/x.json")
    args = ap.parse_args([])
    assert (args.experts, args.out, args.workers, args.seeds, args.steps) == (4, "results/x.json", 2, [0, 1, 2], 500)
    assert ap.parse_args(["--workers", "1", "--seeds", "3"]).seeds == [3]
