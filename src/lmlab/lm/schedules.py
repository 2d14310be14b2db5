"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state.

- ``cosine``: linear warm-up from 0 to ``max_lr`` over ``warmup_steps``, then cosine decay to ``min_lr``
  at ``total_steps`` (and ``min_lr`` after): the usual LLM pre-training schedule.
- ``constant``: the same warm-up, then ``max_lr``.
- ``rewarm``: continual pre-training from a checkpoint (Gupta et al. 2023, "Continual Pre-Training of
  Large Language Models: How to (re)warm your model?", arXiv 2308.04014, Sec. 3): warm up again,
  linearly from ``start_lr`` (0 in the paper; the previous run's final LR is another common choice)
  to a new ``max_lr`` over ``warmup_steps`` (the paper sweeps 0%, 0.5%, 1% and 2% of the steps), then
  cosine-decay to ``min_lr``. ``warmup_steps=0`` with ``max_lr`` equal to the old min LR is the
  paper's "no re-warming" baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmlab.errors import ConfigError

KINDS = ("cosine", "constant", "rewarm")


@dataclass(frozen=True)
class Schedule:
    kind: str = "cosine"  # cosine | constant | rewarm
    max_lr: float = 1e-3  # peak LR after warm-up
    min_lr: float = 1e-4  # floor of the cosine decay (10% of max_lr: the Chinchilla/LLaMA convention)
    warmup_steps: int = 100
    total_steps: int = 1000  # where the cosine reaches min_lr
    start_lr: float = 0.0  # where the warm-up starts (rewarm only; cosine/constant warm up from 0)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ConfigError("warmup_steps must be >= 0 and total_steps >= 1")
        if not 0 < self.max_lr < math.inf:  # NaN fails every comparison
            raise ConfigError(f"the peak learning rate must be positive and finite, not {self.max_lr}")
        for name, what in (("min_lr", "the cosine floor"), ("start_lr", "the LR a rewarm starts from")):
            if not 0 <= getattr(self, name) <= self.max_lr:
                raise ConfigError(f"{name} ({what}) must be in [0, {self.max_lr}] (at most the peak learning rate), "
                                  f"not {getattr(self, name)}")

    def __call__(self, step: int) -> float:
        """The LR for optimizer step ``step`` (0-based)."""
        start = self.start_lr if self.kind == "rewarm" else 0.0
        if step < self.warmup_steps:
            return start + (self.max_lr - start) * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.max_lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
