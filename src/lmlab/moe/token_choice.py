"""Token-choice (top-k) routing with expert capacity: the sparse MoE baseline of "From Sparse to Soft Mixtures
of Experts" (arXiv 2308.00951, Sec. 3, "Tokens Choice"), as in V-MoE (Riquelme et al. 2021, arXiv 2106.05974).

Shapes: G routing groups (one per sequence: B), T tokens per group, D width, E experts, k choices per
token, C capacity (slots per expert per group).

What is implemented:
- :func:`top_k_routing` (usable on its own, e.g. by a pre-gated LM): router probabilities = softmax over
  experts (V-MoE Eq. 1, optional Gaussian logit noise applied by the caller); each token picks its top-k
  experts; the gate is the softmax probability (V-MoE does not renormalise the k gates; ``renormalize=True``
  gives Mixtral's renormalised gates). Capacity per expert C = ceil(k * c * T / E) (V-MoE Sec. 2.2 / GShard).
  Assignments are served in priority order and an assignment whose position in its expert's buffer is
  >= C is dropped. The default order is V-MoE's: all tokens' 1st choices (in token order) before any 2nd
  choice. ``batch_priority=True`` is Batch Prioritized Routing (V-MoE Sec. 4.1): tokens are ordered by
  their highest gate, so under pressure the lowest-scoring tokens are the ones dropped. ``order="token"``
  serves each token's k choices before the next token's, which depends only on earlier tokens (causal).
- :class:`TokenChoiceMoE`: the layer; dispatch/combine by index (scatter into an (E, G*C, D) buffer, one
  batched expert matmul, gather back weighted by the gate), no dense (T, E, C) one-hot einsum.
- auxiliary losses from :mod:`lmlab.moe.losses`: ``balance_loss="switch"`` (default, Switch Eq. 4),
  ``"importance_load"`` (V-MoE's pair, needs noise_std > 0 for the load term) or ``"none"``; plus the
  router z-loss (ST-MoE) with ``z_loss_coef``.

Deviations: groups are whole sequences (V-MoE groups tokens across images on each device).
Official code: google-research/vmoe ``vmoe/moe.py`` (``_create_top_k_dispatcher``) and ``vmoe/nn/routing.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.moe import losses
from lmlab.moe.experts import Experts, MoEOutput

ORDERS = ("choice", "token")
BALANCE_LOSSES = ("switch", "importance_load", "none")


@dataclass
class TokenChoiceRouting:
    """Which experts each token goes to, with what gate, and which assignments fit under capacity."""

    expert_index: Tensor  # (G, T, k) long: the token's j-th choice
    gates: Tensor  # (G, T, k) float: router probability of that choice (differentiable)
    position: Tensor  # (G, T, k) long: position in the expert's buffer in priority order (may be >= capacity)
    kept: Tensor  # (G, T, k) bool: position < capacity
    capacity: int  # C, slots per expert per group
    router_probs: Tensor  # (G, T, E) softmax of the logits
    tokens_per_expert: Tensor  # (E,) long: kept assignments per expert, summed over groups

    @property
    def dropped_assignments(self) -> Tensor:
        """(G, T) long: how many of each token's k assignments were dropped for capacity."""
        return (~self.kept).sum(-1)


def expert_capacity(num_tokens: int, num_experts: int, *, k: int, capacity_factor: float | None) -> int:
    """C = ceil(k * c * T / E), at most T (an expert cannot receive a token twice); None -> T (no dropping)."""
    if capacity_factor is None:
        return num_tokens
    if capacity_factor <= 0:
        raise ConfigError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, min(num_tokens, math.ceil(k * capacity_factor * num_tokens / num_experts)))


def top_k_routing(router_logits: Tensor, *, k: int = 1, capacity: int | None = None,
                  capacity_factor: float | None = None, batch_priority: bool = False, order: str = "choice",
                  renormalize: bool = False) -> TokenChoiceRouting:
    """Route (G, T, E) logits: top-k experts per token, then drop what exceeds each expert's capacity.

    Give ``capacity`` directly, or ``capacity_factor`` (C = ceil(k c T / E)), or neither (no dropping).
    """
    if router_logits.dim() != 3:
        raise ValueError(f"router_logits must be (G, T, E), got {tuple(router_logits.shape)}")
    g, t, e = router_logits.shape
    if not 1 <= k <= e:
        raise ConfigError(f"k must be in [1, num_experts={e}], got {k}")
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
    if batch_priority and order == "token":
        raise ConfigError("batch_priority reorders tokens by score, which is incompatible with order='token'")
    if capacity is None:
        capacity = expert_capacity(t, e, k=k, capacity_factor=capacity_factor)
    router_probs = F.softmax(router_logits.float(), dim=-1).to(router_logits.dtype)  # V-MoE Eq. 1
    gates, expert_index = router_probs.topk(k, dim=-1)  # (G, T, k)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)

    mask = F.one_hot(expert_index, e)  # (G, T, k, E)
    if batch_priority:  # V-MoE Sec. 4.1: serve tokens in decreasing order of their top gate
        priority = torch.argsort(gates[..., 0].detach(), dim=1, descending=True, stable=True)  # (G, T)
        mask = mask.gather(1, priority[:, :, None, None].expand_as(mask))
    if order == "choice":  # all 1st choices, then all 2nd choices, ... (V-MoE / GShard)
        flat = mask.transpose(1, 2).reshape(g, k * t, e)
        pos = (flat.cumsum(1) - 1).view(g, k, t, e).transpose(1, 2)
    else:  # token by token: token i's choices come before token i+1's (depends only on the past)
        pos = (mask.reshape(g, t * k, e).cumsum(1) - 1).view(g, t, k, e)
    pos = (pos * mask).sum(-1)  # (G, T, k): position within the chosen expert
    if batch_priority:
        pos = torch.empty_like(pos).scatter_(1, priority[:, :, None].expand_as(pos), pos)
    kept = pos < capacity
    tokens_per_expert = torch.bincount(expert_index[kept], minlength=e)
    return TokenChoiceRouting(expert_index=expert_index, gates=gates, position=pos, kept=kept, capacity=capacity,
                              router_probs=router_probs, tokens_per_expert=tokens_per_expert)


def dispatch_combine(x: Tensor, routing: TokenChoiceRouting, experts: Experts) -> Tensor:
    """Run the kept assignments of ``routing`` through ``experts``: (G, T, D) -> (G, T, D), gate-weighted sum.

    Each kept assignment (g, t, j) goes to row (e * G + g) * C + position of an (E * G * C, D) buffer, so the
    experts see (E, G*C, D) with one batched matmul; empty slots are zeros (their outputs are never read).
    """
    g, t, d = x.shape
    e, c = experts.num_experts, routing.capacity
    kept = routing.kept
    group = torch.arange(g, device=x.device)[:, None, None].expand_as(kept)
    token = (group * t + torch.arange(t, device=x.device)[None, :, None]).expand_as(kept)[kept]  # (A,)
    slot = ((routing.expert_index * g + group) * c + routing.position)[kept]  # (A,) unique rows
    x_flat = x.reshape(g * t, d)
    buffer = x_flat.new_zeros(e * g * c, d).index_copy(0, slot, x_flat[token])
    out = experts(buffer.view(e, g * c, d)).reshape(e * g * c, d)
    contrib = out[slot] * routing.gates[kept].unsqueeze(-1)  # combine: gate-weighted expert outputs
    y = contrib.new_zeros(g * t, d).index_add(0, token, contrib)  # dtype of the experts' output (autocast)
    return y.view(g, t, d).to(x.dtype)


@dataclass(frozen=True)
class TokenChoiceConfig:
    num_experts: int = 8
    k: int = 1  # Soft MoE paper's Tokens Choice baseline: top-1 (and top-2) with BPR
    capacity_factor: float | None = 1.0  # C = ceil(k c T / E); None: no dropping
    batch_priority: bool = True  # BPR, as in the Soft MoE paper's sparse baselines
    noise_std: float | None = None  # router logit noise in training; None: 1/E (V-MoE's default)
    renormalize: bool = False  # V-MoE: raw softmax gates; Mixtral: renormalised over the k choices
    balance_loss: str = "switch"  # switch | importance_load | none
    balance_coef: float = 0.01  # Switch's alpha = 1e-2
    z_loss_coef: float = 0.0  # ST-MoE uses 1e-3


class TokenChoiceMoE(nn.Module):
    """Top-k token-choice MoE layer: ``TokenChoiceMoE(dim, hidden=4*dim, num_experts=8, k=1)(x) -> MoEOutput``."""

    def __init__(self, dim: int, *, hidden: int, num_experts: int = 8, k: int = 1,
                 capacity_factor: float | None = 1.0, batch_priority: bool = True, noise_std: float | None = None,
                 renormalize: bool = False, balance_loss: str = "switch", balance_coef: float = 0.01,
                 z_loss_coef: float = 0.0, activation: str = "gelu"):
        super().__init__()
        if balance_loss not in BALANCE_LOSSES:
            raise ConfigError(f"balance_loss must be one of {BALANCE_LOSSES}, got {balance_loss!r}")
        if not 1 <= k <= num_experts:
            raise ConfigError(f"k must be in [1, num_experts={num_experts}], got {k}")
        self.config = TokenChoiceConfig(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                                        batch_priority=batch_priority, noise_std=noise_std, renormalize=renormalize,
                                        balance_loss=balance_loss, balance_coef=balance_coef, z_loss_coef=z_loss_coef)
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.router.weight, std=(0.1 / dim) ** 0.5)  # Switch Sec. 2.4: init scale s=0.1
        self.experts = Experts(num_experts, dim=dim, hidden=hidden, activation=activation)

    @property
    def noise_std(self) -> float:
        return 1.0 / self.num_experts if self.config.noise_std is None else self.config.noise_std

    def forward(self, x: Tensor, *, causal: bool = False) -> MoEOutput:
        cfg = self.config
        if causal and cfg.batch_priority:
            raise ConfigError("batch-priority routing orders tokens by score across the whole sequence, so it is "
                              "not causal: build the layer with batch_priority=False for causal use")
        clean = self.router(x)  # (B, T, E)
        noisy = clean + self.noise_std * torch.randn_like(clean) if self.training and self.noise_std > 0 else clean
        routing = top_k_routing(noisy, k=cfg.k, capacity_factor=cfg.capacity_factor,
                                batch_priority=cfg.batch_priority, order="token" if causal else "choice",
                                renormalize=cfg.renormalize)
        y = dispatch_combine(x, routing, self.experts)
        aux = x.new_zeros(())
        if cfg.balance_loss == "switch" and cfg.balance_coef:
            aux = aux + cfg.balance_coef * losses.switch_balance_loss(routing.router_probs, routing.expert_index)
        elif cfg.balance_loss == "importance_load" and cfg.balance_coef:
            aux = aux + cfg.balance_coef * losses.importance_loss(routing.router_probs)
            if self.training and self.noise_std > 0:
                aux = aux + cfg.balance_coef * losses.load_loss(clean, noisy, noise_std=self.noise_std, k=cfg.k)
        if cfg.z_loss_coef:
            aux = aux + cfg.z_loss_coef * losses.router_z_loss(noisy)
        return MoEOutput(y=y, router_logits=noisy, tokens_per_expert=routing.tokens_per_expert,
                         dropped=~routing.kept.any(-1), aux_loss=aux, routing=routing)
