"""Training and evaluation of :class:`lmlab.moe.vit.ViT` image classifiers (the recipes' shared loop).

AdamW with warm-up + cosine LR (:class:`lmlab.lm.schedules.Schedule`), cross-entropy plus the MoE layers'
auxiliary losses, gradient clipping, and, when ``ewa_beta > 0``, EWA's expert averaging after every
optimizer step (:func:`lmlab.moe.ewa.ewa_update_`). Batches are drawn from seeded per-epoch permutations,
so a run is a function of its config. Models are saved as a folder: ``model.safetensors`` + ``manifest.json``
(ViT config, training config, metrics, checksums). :func:`run_jobs` runs independent training runs (one per
seed / setting) in spawned worker processes with one torch thread each, for the recipes' ``--workers``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.io import atomic_dir, existing_artefact, read_manifest, write_manifest
from lmlab.lm.schedules import Schedule
from lmlab.moe.data import ImageSplit
from lmlab.moe.ewa import ewa_update_
from lmlab.moe.vit import ViT, ViTConfig


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak LR (small-ViT-on-small-data convention)
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05  # DeiT's AdamW weight decay
    grad_clip: float = 1.0
    seed: int = 0
    ewa_beta: float = 0.0  # EWA share rate; > 0 averages experts after every step (2308.06093 Sec. 3.2)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:  # an empty batch trains on nothing and logs a NaN loss
            raise ConfigError(f"steps and batch_size must be >= 1, got steps={self.steps}, "
                              f"batch_size={self.batch_size}")
        if not (0 < self.lr < math.inf and 0 <= self.min_lr < math.inf):  # NaN fails both
            raise ConfigError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 <= self.ewa_beta <= 1.0:  # NaN too  # checked here, before training, not at the first EWA update
            raise ConfigError(f"ewa_beta (EWA's share rate) must be in [0, 1], got {self.ewa_beta}")


@dataclass
class TrainResult:
    losses: list[float]  # per step: cross-entropy (without the aux loss)
    step_seconds: list[float]  # wall time of each optimizer step (forward + backward + update [+ EWA])
    config: TrainConfig
    aux_losses: list[float] = field(default_factory=list)

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds[min(10, len(self.step_seconds) - 1):])


def train_classifier(model: ViT, data: ImageSplit, config: TrainConfig, *, progress: bool = False) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``config.steps`` steps; returns per-step losses and times."""
    if len(data) == 0:
        raise DataError("no training images: check --train-size / --val-size and the data folder")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "pos_embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    schedule = Schedule("cosine", max_lr=config.lr, min_lr=min(config.min_lr, config.lr),
                        warmup_steps=min(config.warmup_steps, config.steps - 1), total_steps=config.steps)
    n = len(data)
    perm, cursor = torch.randperm(n, generator=gen), 0
    losses, aux_losses, times = [], [], []
    from tqdm import tqdm

    model.train()
    with tqdm(total=config.steps, desc="train", leave=False, disable=not progress) as bar:  # closed on any exit
        for step in range(config.steps):
            if cursor + config.batch_size > n:
                perm, cursor = torch.randperm(n, generator=gen), 0
            idx = perm[cursor:cursor + config.batch_size]
            cursor += config.batch_size
            x, y = data.images[idx], data.labels[idx]
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            out = model(x)
            loss = F.cross_entropy(out.logits, y)
            opt.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            if config.ewa_beta > 0:
                ewa_update_(model, config.ewa_beta)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):  # every later step would be NaN too, and the saved model useless
                raise ConfigError(f"training diverged at step {step + 1}: the loss is {losses[-1]}; lower the "
                                  f"learning rate (lr={config.lr})")
            aux_losses.append(float(out.aux_loss.detach()))
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return TrainResult(losses=losses, step_seconds=times, config=config, aux_losses=aux_losses)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSplit, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.images[start:start + batch_size]).logits
        correct += (logits.argmax(-1) == data.labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(data))


KIND = "lmlab.moe.vit"


def check_model_folder(folder: str | Path) -> None:
    """Refuse a ``folder`` that :func:`save_model` must not replace: only a missing or empty one, or an earlier
    saved ViT, is replaced (call it before training, so the refusal does not come after the work)."""
    existing_artefact(folder, KIND, what="saved ViT")


def save_model(model: ViT, folder: str | Path, *, info: dict | None = None) -> Path:
    """Write ``folder`` atomically: model.safetensors + manifest.json (config, ``info``, checksums); an existing
    ``folder`` is replaced only if it is an earlier saved ViT (or empty)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    check_model_folder(folder)
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        write_manifest(tmp, {"kind": KIND, "vit_config": model.config.to_dict(), **(info or {})})
    return folder


def load_model(folder: str | Path) -> tuple[ViT, dict]:
    """The ViT saved by :func:`save_model` and its manifest (checksums verified)."""
    from safetensors.torch import load_file

    manifest = read_manifest(folder, verify=True)
    if manifest.get("kind") != KIND:
        raise ManifestMismatchError(f"{folder} is not an lmlab.moe ViT checkpoint (kind={manifest.get('kind')!r})")
    model = ViT(ViTConfig(**manifest["vit_config"]))
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model, manifest


def _init_worker(initializer: Callable | None, initargs: tuple) -> None:
    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


def run_jobs(fn: Callable, jobs: Sequence[tuple], *, workers: int = 1, initializer: Callable | None = None,
             initargs: tuple = ()) -> list:
    """``[fn(*job) for job in jobs]``, in ``workers`` spawned processes when ``workers > 1``.

    Each worker calls ``torch.set_num_threads(1)`` then ``initializer(*initargs)`` (e.g. to load the data set
    once per process); ``fn``, ``initializer`` and the jobs must be picklable (module-level functions). Results
    come back in the order of ``jobs``. Training runs that seed themselves (as :func:`train_classifier` does)
    give the same numbers as in one process with one thread. With ``workers == 1`` everything runs here, and
    ``initializer`` is the caller's business.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers == 1 or not jobs:
        return [fn(*job) for job in jobs]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(initializer, initargs)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def train_config_dict(config: TrainConfig) -> dict:
    return asdict(config)


def add_vit_recipe_arguments(ap, *, experts: int, out: str) -> None:
    """The flags the ViT recipes (``recipes/soft_moe.py``, ``recipes/ewa.py``) share: data, schedule, seeds,
    model size, workers and output; each recipe adds its own grid (learning rates, share rates, kinds)."""
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch-size", type=int, default=7, help="7: 16 tokens (fast); 4: 49 tokens")
    ap.add_argument("--experts", type=int, default=experts)
    ap.add_argument("--moe-layers", type=int, default=2, help="MoE MLPs in the last this-many blocks")
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="parallel runs, one process and one thread each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads with --workers 1")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=out)
    ap.add_argument("--resummarize", action="store_true",
                    help="only recompute the summary of --out from its per-seed rows (no training)")
