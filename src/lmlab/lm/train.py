"""Causal-LM training for any Hugging Face ``AutoModelForCausalLM`` from token shards.

What the :class:`Trainer` does, and why it is shaped this way:

- AdamW with decoupled weight decay on matrices only (not on norms or biases), gradient clipping,
  gradient accumulation, and an LR :class:`~lmlab.lm.schedules.Schedule` that is a pure function of the
  step.
- Batches are a pure function of ``(seed, step, micro-batch index)`` (:meth:`TokenShards.sample`), and
  the torch RNG is re-seeded from ``(seed, step, rank)`` before every step (dropout). So a checkpoint
  only needs weights, optimizer state and the step, and a run interrupted and resumed produces the
  same loss curve as an uninterrupted one (``tests/lm/test_train.py`` checks it).
- Data parallel under ``torchrun`` (DDP; gloo on CPU, nccl on GPU). Micro-batch indices are global,
  ``rank * grad_accum + i``, so 2 processes x ``grad_accum=1`` computes the same update as 1 process x
  ``grad_accum=2`` (also tested).
- Checkpoints are Hugging Face ``save_pretrained`` folders (loadable with ``lmlab.lm.models.load(path)``)
  plus ``trainer_state.pt`` (optimizer state, step, config) and a ``manifest.json`` with checksums,
  written to a temporary folder and renamed into place; Ctrl-C saves one before exiting.
- Metrics go to ``metrics.jsonl`` (one JSON object per logged step / evaluation).

Why not ``transformers.Trainer`` or accelerate: their resume replays the data loader and does not
promise an identical curve, and their checkpoint folders are not plain model folders; this loop is
~300 lines a newcomer can read, and the benchmark holds it to >= 90% of a bare training loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.errors import CheckpointError, ConfigError, DataError, first_line
from lmlab.io import (
    atomic_dir,
    ctrl_c_held,
    existing_artefact,
    read_manifest,
    write_bytes_atomic,
    write_manifest,
)
from lmlab.lm.data import TokenShards, tokenizer_fingerprint
from lmlab.lm.schedules import Schedule
from lmlab.lm.score import eval_mode

CKPT_RE = re.compile(r"^step-(\d{8})$")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256  # tokens per training window
    batch_size: int = 16  # windows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step, per process
    max_steps: int = 1000  # optimizer steps
    schedule: str = "cosine"  # cosine | constant | rewarm (lmlab.lm.schedules)
    lr: float = 1e-3  # peak LR; 1e-3 suits the tiny presets, ~3e-4 for 100M+ models
    min_lr: float = 1e-4  # cosine floor: 10% of peak (Chinchilla / LLaMA)
    warmup_steps: int = 100
    rewarm_start_lr: float = 0.0  # rewarm only: LR the warm-up starts from (0 in arXiv 2308.04014)
    weight_decay: float = 0.1  # AdamW, matrices only (GPT-3 / LLaMA)
    beta1: float = 0.9
    beta2: float = 0.95  # LLaMA / GPT-3; 0.999 (PyTorch default) is less stable for LMs
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    eval_every: int = 100  # optimizer steps between evaluations; 0 disables
    eval_batches: int = 8  # validation batches per evaluation (fixed, in order)
    save_every: int = 200  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    log_every: int = 10  # optimizer steps between metric lines
    seed: int = 0

    def schedule_fn(self) -> Schedule:
        return Schedule(kind=self.schedule, max_lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                        total_steps=self.max_steps, start_lr=self.rewarm_start_lr)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, lo in (("seq_len", 1), ("batch_size", 1), ("grad_accum", 1), ("max_steps", 1), ("log_every", 1),
                         ("eval_batches", 1), ("keep_checkpoints", 1), ("eval_every", 0), ("save_every", 0)):
            if not getattr(self, name) >= lo:
                raise ConfigError(f"{name} must be >= {lo}, not {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:  # numpy's generators take no negative seed, torch's none above 64 bits
            raise ConfigError(f"seed must be in [0, {MAX_SEED}], not {self.seed}")
        self.schedule_fn()  # raises on a bad schedule or learning rate


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    tokens: int  # training tokens seen (all processes)
    train_loss: float  # mean loss of the last logged interval
    eval_loss: float | None  # last evaluation (nats/token)
    out_dir: Path
    history: list[dict] = field(default_factory=list)  # the metrics lines of this call

    @property
    def eval_ppl(self) -> float | None:
        return None if self.eval_loss is None else math.exp(self.eval_loss)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when every local process can have its own, else the CPU."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise.

    nccl when every local process has its own GPU, gloo on the CPU otherwise (also when there are more
    processes than GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if default_device(local_rank).type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown_distributed() -> None:
    """Leave the process group cleanly (a barrier, then destroy), so no rank exits while a peer still talks.

    Without this, a rank that exits first can make gloo abort its peer (SIGABRT) during interpreter shutdown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _corrupt(ckpt: Path, error: Exception) -> CheckpointError:
    """A damaged checkpoint (disk full, killed while copying): say which, and how to fall back to an older one."""
    reason = first_line(error, 200)
    return CheckpointError(f"{ckpt} is corrupt or incomplete ({reason}); delete that folder to resume from the "
                           "previous checkpoint, if any")


def _step_folders(out_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoints/step-NNNNNNNN`` folders under ``out_dir``, oldest first (complete or not; nothing else)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if CKPT_RE.match(p.name)) if root.is_dir() else []


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The highest-step complete checkpoint (one with a manifest) under ``out_dir/checkpoints``."""
    done = [p for p in _step_folders(out_dir) if (p / "manifest.json").is_file()]
    return done[-1] if done else None


def _checkpoint_weights(ckpt: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` folder: ``model.safetensors``, or every shard its
    ``model.safetensors.index.json`` names (``save_pretrained`` splits models above ``max_shard_size``)."""
    from safetensors.torch import load_file

    index = ckpt / "model.safetensors.index.json"
    names = ["model.safetensors"]
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if any(Path(n).name != n for n in names):
            raise DataError(f"{index} names shards outside its folder")
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        weights.update(load_file(str(ckpt / name), device=str(device)))
    return weights


def _line_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line; None for an empty line or one torn by a crash."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels`` are the targets already aligned with ``input_ids``."""
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


class Trainer:
    """Train ``model`` on ``train`` token shards; see the module docstring.

    ``out_dir`` receives ``metrics.jsonl``, ``checkpoints/step-NNNNNNNN/`` and finally ``model/``.
    With ``resume=True`` (default) an existing run in ``out_dir`` continues from its latest checkpoint;
    a checkpoint whose config differs in anything but ``max_steps``/``eval``/``save``/``log`` settings is
    refused. With ``resume=False`` an existing run's checkpoints are deleted: the run starts over.
    To continue pre-training another run (arXiv 2308.04014), load its ``model/`` or checkpoint folder as the model
    (``models.load(path)``), give a new ``out_dir`` and use ``schedule="rewarm"``: the optimizer starts fresh.
    """

    RESUMABLE_CHANGES = {"max_steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every"}

    def __init__(self, model, tokenizer, train: TokenShards, config: TrainConfig, out_dir: str | os.PathLike, *,
                 validation: TokenShards | None = None, resume: bool = True, progress: bool = True,
                 device: str | None = None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint
        train.check_tokenizer(tokenizer)
        if validation is not None:
            validation.check_tokenizer(tokenizer)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ConfigError(f"the model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller "
                              f"than the tokenizer's ({len(tokenizer)})")
        self.dist = init_distributed()
        self.device = torch.device(device) if device else default_device(self.dist.local_rank)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.train_data, self.val_data = train, validation
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress and self.dist.is_main
        self.schedule = config.schedule_fn()
        self.optimizer = self._make_optimizer()
        self.step = 0
        # loss sum and step count since the last metrics line: checkpointed, so a run resumed between two log
        # steps logs the same mean loss as an uninterrupted one
        self._interval_loss = torch.zeros((), device=self.device)
        self._interval_n = 0
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        else:
            self.ddp = None
        if resume and (ckpt := latest_checkpoint(self.out_dir)) is not None:
            self._load(ckpt)
        elif not resume and self.dist.is_main:  # starting over: an old run's later steps would outrank this run's
            for old in _step_folders(self.out_dir):  # checkpoints in pruning and resume (only ours are deleted)
                shutil.rmtree(old, ignore_errors=True)
        if self.dist.is_main:
            # export() replaces out_dir/model at the end: refuse a folder of someone else's now
            existing_artefact(self.out_dir / "model", "model", what="model exported by a run")
            self._truncate_metrics(self.step)  # also at step 0: a run that died before its first checkpoint left lines

    # ----- setup -------------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.schedule(0), betas=(c.beta1, c.beta2), eps=c.eps, fused=fused)

    @property
    def _net(self):
        return self.ddp if self.ddp is not None else self.model

    # ----- checkpoints -------------------------------------------------------------------------------------
    def _load(self, ckpt: Path) -> None:
        state_path = ckpt / "trainer_state.pt"
        if not state_path.is_file():
            raise CheckpointError(f"{ckpt} has no trainer_state.pt: not a Trainer checkpoint")
        try:
            read_manifest(ckpt, verify=True)  # sizes (and checksums where listed): a truncated file is caught here
            state = torch.load(state_path, map_location=self.device, weights_only=False)
        except Exception as e:  # DataError, or whatever torch.load / unpickling raises on a damaged file
            raise _corrupt(ckpt, e) from e
        old, new = state["config"], asdict(self.config)
        changed = {k for k in new if old.get(k) != new[k]} - self.RESUMABLE_CHANGES
        if changed:
            raise CheckpointError(
                f"{self.out_dir} holds a run with different settings ({', '.join(sorted(changed))}); "
                "use another --out folder, or the same settings to resume")
        if state.get("tokenizer_fingerprint") != tokenizer_fingerprint(self.tokenizer):
            raise CheckpointError(f"{ckpt} was trained with another tokenizer")
        try:
            weights = _checkpoint_weights(ckpt, self.device)
        except Exception as e:  # SafetensorError, OSError, a damaged shard index
            raise _corrupt(ckpt, e) from e
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        # tied embeddings are saved once; anything else missing means another architecture
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise CheckpointError(f"{ckpt} does not match the model (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        interval = state.get("interval")  # absent in older checkpoints and after a Ctrl-C under DDP
        if interval is not None:
            self._interval_loss.fill_(interval["loss_sum"])
            self._interval_n = interval["n"]

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from, so the curve has no duplicates, and a
        last line torn by a crash while it was written."""
        path = self.out_dir / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if (line_step := _line_step(line)) is not None and line_step <= step]
            write_bytes_atomic(path, ("\n".join(keep) + "\n" if keep else "").encode())

    def _interval_state(self, *, collective: bool) -> dict | None:
        """The unlogged loss interval for a checkpoint; under DDP the mean over ranks (a collective: every rank
        must call it), or None where a collective is not safe (``collective=False``, e.g. on Ctrl-C)."""
        if self._interval_n == 0:
            return {"loss_sum": 0.0, "n": 0}
        if self.ddp is not None and not collective:
            return None
        return {"loss_sum": self._mean_across_ranks(self._interval_loss), "n": self._interval_n}

    def save_checkpoint(self, *, interval: dict | None = None) -> Path | None:
        """Write ``checkpoints/step-NNNNNNNN`` (rank 0), then prune old ones; returns its path.

        ``interval``: the unlogged loss interval (:meth:`_interval_state`); by default this process's own
        (None under DDP, where resuming then logs the first interval from the resumed step only).
        """
        if interval is None and self.ddp is None:
            interval = self._interval_state(collective=False)
        if not self.dist.is_main:
            return None
        final = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        with atomic_dir(final) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "config": asdict(self.config),
                        "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer), "interval": interval},
                       tmp / "trainer_state.pt")
            write_manifest(tmp, {"kind": "checkpoint", "step": self.step, "config": asdict(self.config),
                                 "train_data": str(self.train_data.folder),
                                 "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)}, checksum=False)
        for old in _step_folders(self.out_dir)[:-max(1, self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def export(self, name: str = "model") -> Path:
        """Save the current weights + tokenizer as a plain HF folder ``out_dir/<name>`` (rank 0)."""
        final = self.out_dir / name
        if self.dist.is_main:
            with atomic_dir(final) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                write_manifest(tmp, {"kind": "model", "step": self.step, "config": asdict(self.config),
                                     "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)})
        return final

    # ----- the loop ----------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss (nats/token) over the first ``eval_batches`` validation batches; None without data."""
        if self.val_data is None or self.val_data.n_tokens <= self.config.seq_len:
            return None
        total, n = 0.0, 0
        with eval_mode(self.model):  # restores the caller's mode, also after a Ctrl-C
            for b in self.val_data.sequential(self.config.seq_len, self.config.batch_size,
                                              max_batches=self.config.eval_batches):
                loss = lm_loss(self.model, b.input_ids.to(self.device), b.labels.to(self.device))
                total += loss.item() * b.labels.numel()
                n += b.labels.numel()
        return total / n if n else None

    def train_step(self) -> float:
        """One optimizer step (all micro-batches); returns the mean loss over this process's micro-batches."""
        c = self.config
        torch.manual_seed(hash((c.seed, self.step, self.dist.rank)) & 0x7FFF_FFFF)  # dropout, stateless
        lr = self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # a step interrupted mid-accumulation (Ctrl-C, then fit() again in the same process) leaves gradients
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(c.grad_accum):
            micro = self.dist.rank * c.grad_accum + i
            b = self.train_data.sample(c.seq_len, c.batch_size, seed=c.seed, step=self.step, micro=micro)
            sync = self.ddp is None or i == c.grad_accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = lm_loss(self._net, b.input_ids.to(self.device, non_blocking=True),
                               b.labels.to(self.device, non_blocking=True))
                (loss / c.grad_accum).backward()
            loss_sum += loss.detach()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        with ctrl_c_held():  # the update and its step count land together, so a Ctrl-C checkpoint is consistent
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        return loss_sum / c.grad_accum

    def _mean_across_ranks(self, x: torch.Tensor) -> float:
        if self.ddp is not None:
            import torch.distributed as dist

            x = x.clone()
            dist.all_reduce(x)
            x /= self.dist.world_size
        return float(x)

    def fit(self, *, until_step: int | None = None) -> TrainResult:
        """Train until ``max_steps`` (or ``until_step``, to stop early), checkpointing on the way.

        Ctrl-C saves a checkpoint at the last completed step before re-raising, so the next call resumes.
        """
        c = self.config
        stop = min(c.max_steps, until_step) if until_step is not None else c.max_steps
        tokens_per_step = c.seq_len * c.batch_size * c.grad_accum * self.dist.world_size
        history: list[dict] = []
        self.model.train()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        timed_n, t0 = 0, time.perf_counter()  # steps timed for tokens_per_s (this call only)
        train_loss = float("nan")
        eval_loss = None
        # A step counted but not yet logged although its metrics line was due: an earlier fit() stopped while
        # evaluating or logging it (Ctrl-C, an error). Log it first, then save again: its checkpoint holds that
        # interval as unlogged.
        pending = self._interval_n > 0 and (self.step % c.log_every == 0 or self.step == c.max_steps)
        last_saved = -1 if pending else self.step
        try:
            while pending or self.step < stop:
                if not pending:
                    self._interval_loss += self.train_step()
                    self._interval_n += 1
                    timed_n += 1
                    if bar is not None:
                        bar.update(1)
                pending = False
                last = self.step == c.max_steps  # an early stop (until_step) logs nothing extra: resume stays exact
                if self.step % c.log_every == 0 or last:
                    train_loss = self._mean_across_ranks(self._interval_loss / self._interval_n)
                    dt = time.perf_counter() - t0
                    rec = {"step": self.step, "loss": train_loss, "lr": self.schedule(self.step - 1),
                           "tokens": self.step * tokens_per_step,
                           "tokens_per_s": timed_n * tokens_per_step / dt if timed_n else None}
                    if c.eval_every and (self.step % c.eval_every == 0 or last):
                        eval_loss = self.evaluate()
                        if eval_loss is not None:
                            rec.update(eval_loss=eval_loss, eval_ppl=math.exp(eval_loss))
                    with ctrl_c_held():  # the line and the reset land together: a resume logs the step once
                        self._log(rec)
                        self._interval_loss.zero_()
                        self._interval_n = 0
                    history.append(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{rec['lr']:.2e}")
                    timed_n, t0 = 0, time.perf_counter()
                if c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint(interval=self._interval_state(collective=True))
                    last_saved = self.step
        except KeyboardInterrupt:
            if self.step > last_saved:
                self.save_checkpoint()
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.step > last_saved or latest_checkpoint(self.out_dir) is None:
            self.save_checkpoint(interval=self._interval_state(collective=True))
        if self.step >= c.max_steps:
            self.export()
        if self.ddp is not None:
            import torch.distributed as dist

            dist.barrier()
        return TrainResult(step=self.step, tokens=self.step * tokens_per_step, train_loss=train_loss,
                           eval_loss=eval_loss, out_dir=self.out_dir, history=history)


def load_checkpoint_state(ckpt: str | os.PathLike) -> dict:
    """The manifest of a checkpoint folder (raises a clear error for anything else)."""
    m = read_manifest(ckpt)
    if m.get("kind") not in {"checkpoint", "model"}:
        raise CheckpointError(f"{ckpt} is not an lmlab checkpoint or model folder")
    return m
