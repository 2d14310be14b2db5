"""Expert-choice routing: Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing" (arXiv 2202.09368),
the second sparse baseline of "From Sparse to Soft Mixtures of Experts" (arXiv 2308.00951, Sec. 3, "Experts Choice").

Shapes: G routing groups (one per sequence: B), T tokens, D width, E experts, C tokens per expert.

What is implemented (Sec. 3.2 of 2202.09368, Eq. 1):
    S = softmax(X W_g) over experts       (G, T, E) token-to-expert scores
    G_, I = TopK(S^T, C) over tokens      each expert takes exactly its C highest-scoring tokens
    C = round(c * T / E)  (capacity factor c; "k = n c / e" in the paper), 1 <= C <= T
    y_t = sum over (e, j) with I[e, j] = t of G_[e, j] * expert_e(x_t)
A token may be taken by several experts or by none (then ``dropped`` is True and only the residual
carries it). There is no auxiliary loss: load is balanced by construction; ``z_loss_coef`` optionally adds
ST-MoE's router z-loss.

Expert choice is not causal (an expert's top-C is taken over the whole sequence, future tokens included):
``causal=True`` raises :class:`~lmlab.errors.ConfigError`.
Official code: none public for the paper; vmoe implements it as ``ExpertsChooseMaskedRouter`` (vmoe/nn/routing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.moe import losses
from lmlab.moe.experts import Experts, MoEOutput


@dataclass
class ExpertChoiceRouting:
    token_index: Tensor  # (G, E, C) long: the tokens expert e took, best first
    gates: Tensor  # (G, E, C) float: their scores S[t, e] (differentiable)
    capacity: int
    router_probs: Tensor  # (G, T, E)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """C = round(c * T / E), clipped to [1, T]."""
    if capacity_factor <= 0:
        raise ConfigError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, min(num_tokens, round(capacity_factor * num_tokens / num_experts)))


def expert_choice_routing(router_logits: Tensor, *, capacity: int) -> ExpertChoiceRouting:
    """(G, T, E) logits -> each expert's top-``capacity`` tokens by softmax-over-experts score (Eq. 1)."""
    router_probs = F.softmax(router_logits.float(), dim=-1).to(router_logits.dtype)
    gates, token_index = router_probs.transpose(1, 2).topk(capacity, dim=-1)  # (G, E, C)
    return ExpertChoiceRouting(token_index=token_index, gates=gates, capacity=capacity, router_probs=router_probs)


@dataclass(frozen=True)
class ExpertChoiceConfig:
    num_experts: int = 8
    capacity_factor: float = 1.0  # c = 1 matches top-1 token choice and dense FLOPs (EC paper's EC-CF2 uses 2)
    z_loss_coef: float = 0.0


class ExpertChoiceMoE(nn.Module):
    """``ExpertChoiceMoE(dim, hidden=4*dim, num_experts=8, capacity_factor=1.0)(x) -> MoEOutput``."""

    def __init__(self, dim: int, *, hidden: int, num_experts: int = 8, capacity_factor: float = 1.0,
                 z_loss_coef: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.config = ExpertChoiceConfig(num_experts=num_experts, capacity_factor=capacity_factor,
                                         z_loss_coef=z_loss_coef)
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.router.weight, std=(0.1 / dim) ** 0.5)  # Switch Sec. 2.4 init scale 0.1
        self.experts = Experts(num_experts, dim=dim, hidden=hidden, activation=activation)

    def forward(self, x: Tensor, *, causal: bool = False) -> MoEOutput:
        if causal:
            raise ConfigError("expert-choice routing is not causal: each expert picks its top tokens over the whole "
                              "sequence, future tokens included. Use TokenChoiceMoE (kind='token_choice') instead.")
        g, t, d = x.shape
        e = self.num_experts
        capacity = expert_choice_capacity(t, e, self.config.capacity_factor)
        logits = self.router(x)
        routing = expert_choice_routing(logits, capacity=capacity)
        # Gather each expert's tokens into (E, G*C, D), one batched matmul, scatter back weighted by G_.
        flat_index = (routing.token_index + torch.arange(g, device=x.device)[:, None, None] * t)  # (G, E, C)
        flat_index = flat_index.transpose(0, 1).reshape(e, g * capacity)
        x_flat = x.reshape(g * t, d)
        out = self.experts(x_flat[flat_index])  # (E, G*C, D)
        gates = routing.gates.transpose(0, 1).reshape(e, g * capacity, 1)
        contrib = (out * gates).reshape(-1, d)
        y = contrib.new_zeros(g * t, d).index_add(0, flat_index.reshape(-1), contrib).to(x.dtype)
        taken = torch.zeros(g * t, dtype=torch.bool, device=x.device)
        taken[flat_index.reshape(-1)] = True
        aux = x.new_zeros(())
        if self.config.z_loss_coef:
            aux = aux + self.config.z_loss_coef * losses.router_z_loss(logits)
        return MoEOutput(y=y.view(g, t, d), router_logits=logits,
                         tokens_per_expert=torch.full((e,), g * capacity, dtype=torch.long, device=x.device),
                         dropped=~taken.view(g, t), aux_loss=aux, routing=routing)
