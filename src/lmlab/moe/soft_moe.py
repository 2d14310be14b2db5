"""Soft MoE: Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts" (arXiv 2308.00951).

Shapes: B batch (one routing group per sequence), T tokens, D width, E experts, S slots per expert,
H expert hidden width.

What is implemented (Sec. 2.1, Algorithm 1, and the normalisation of Sec. 2.3):
    logits  = X_hat . (scale * Phi_hat)                    (B, T, E*S)   X_hat, Phi_hat L2-normalised over D
    D = dispatch_weights = softmax over tokens (axis T)     each slot is a convex combination of tokens (Eq. 1)
    C = combine_weights  = softmax over all E*S slots       each token is a convex combination of slots (Eq. 2)
    X~ = D^T X   (un-normalised X, as vmoe dispatches the raw inputs)                                (Eq. 1)
    Y~ = expert_e(X~ of expert e's S slots)  (one batched matmul over experts, :class:`Experts`)
    Y  = C Y~                                                                                         (Eq. 2)
The slot parameters Phi are (D, E, S); the scalar ``scale`` is learnable and initialised to 1, and
``noise_std`` adds Gaussian noise to the logits in training (both as in vmoe's ``SoftRouter``).
Nothing is dropped: every token reaches every slot with non-zero weight.

Deviations: none intended from vmoe's router; vmoe applies the scale to whichever of inputs/Phi is
smaller (the same product). The number of slots is fixed at construction (``slots_per_expert``, or
``round(capacity_factor * num_tokens / E)`` as vmoe's ``compute_capacity(..., 'round')``).

Soft MoE is not causal: each slot mixes all tokens of the sequence, so token t's output depends on later
tokens. ``forward(..., causal=True)`` raises :class:`~lmlab.errors.ConfigError` rather than leak the future.

Cost (benchmarks/moe.py, CPU, B=16 T=64 D=256 E=8 S=8, one thread; in-process ablations): against a dense MLP of
equal active parameters, (a) the expert bank alone costs 1.08-1.13x: E times the weights are read twice and their
gradients written once per step, and each expert's matmuls see only B*S = 128 rows; (b) routing alone (experts
replaced by an identity) costs 0.23x a dense step: the logits, dispatch and combine matmuls with their backward
(1.5 T / H = 9.4% of the experts' FLOPs, but run about 2x slower than alone because the experts' weight streams
evict their operands from cache), two softmaxes, the input norm (hand-written backward, :class:`_CosineLogits`),
and two (B, E*S, D) <-> (E, B*S, D) layout copies each way (~3%; a strided view instead is slower than the copy).
Together 1.29-1.36x at this shape, and 1.22-1.27x at B = 32-64, where (a) is amortised over more tokens. The slots'
input gradient is needed even when x needs none (the slots depend on the router). A single autograd function for the
whole layer, with no layout copy (slots numbered s*E + e, so the experts read and write strided views) and the
softmax backwards fused, was timed against this code in one process and gained nothing (1.315x vs 1.322x dense): the
copies and element-wise glue are cheap; the memory traffic of E experts' weights is not.

Official code: google-research/vmoe, ``vmoe/projects/soft_moe/router.py`` (JAX). PyTorch port:
lucidrains/soft-moe-pytorch (RMSNorm with learnable per-feature gains on X and Phi, i.e. logits = D * cos at
init, and dispatches the *normalised* X; tests/moe/test_soft_moe.py shows where the two coincide).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.moe.experts import Experts, MoEOutput


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over ``dim`` (vmoe's ``normalize``; Sec. 2.3 "Normalization")."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


@dataclass(frozen=True)
class SoftMoEConfig:
    num_experts: int = 8
    slots_per_expert: int | None = 1  # paper's ViT runs use 1 slot per expert (Sec. 3); None: from capacity_factor
    capacity_factor: float | None = None  # total slots = round(c * num_tokens) when slots_per_expert is None
    num_tokens: int | None = None  # needed only with capacity_factor (Phi's shape is fixed at construction)
    noise_std: float = 0.0  # vmoe SoftRouter default: no logit noise
    scale_init: float = 1.0  # vmoe: scale_init = ones

    def resolved_slots(self) -> int:
        if self.slots_per_expert is not None:
            if self.slots_per_expert < 1:
                raise ConfigError(f"slots_per_expert must be >= 1, got {self.slots_per_expert}")
            return self.slots_per_expert
        if self.capacity_factor is None or self.num_tokens is None:
            raise ConfigError("Soft MoE needs slots_per_expert, or capacity_factor together with num_tokens")
        if self.capacity_factor <= 0:  # else max(1, ...) below would silently turn it into one slot per expert
            raise ConfigError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        return max(1, round(self.capacity_factor * self.num_tokens / self.num_experts))


class _CosineLogits(torch.autograd.Function):
    """``(x @ phi) * rsqrt(|x|^2 + eps)``: x (B, T, D) against already-normalised slot parameters phi (D, N).

    The same numbers as ``l2_normalize(x) @ phi``, with a hand-written backward: autograd's version of the row
    norm (square, sum, rsqrt and their backward passes, plus one more gradient sum into x) makes ~6 passes over
    (B, T, D); this one makes 2 (the norm, and one fused ``dx -= x * c``), ~2% of a Soft MoE fwd+bwd at the
    benchmark's shape. Gradient: dx = (g r) phi^T - x r^2 sum_j (g r)_j u_j, dphi = x^T (g r) with u = x phi.
    """

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, eps: float) -> Tensor:
        u = torch.matmul(x, phi)  # (B, T, N)
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(eps).rsqrt_()  # (B, T, 1)
        ctx.save_for_backward(x, phi, u, r)
        return u * r

    @staticmethod
    def backward(ctx, g: Tensor):
        x, phi, u, r = ctx.saved_tensors
        gu = g * r
        gx = gphi = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(gu, phi.t())
            gx = gx.addcmul_(x, (gu * u).sum(-1, keepdim=True) * r.square(), value=-1)
        if ctx.needs_input_grad[1]:
            gphi = torch.mm(x.reshape(-1, x.shape[-1]).t(), gu.reshape(-1, gu.shape[-1]))
        return gx, gphi, None


class SoftMoE(nn.Module):
    """Soft MoE layer: ``SoftMoE(dim, hidden=4*dim, num_experts=8, slots_per_expert=1)(x) -> MoEOutput``."""

    def __init__(self, dim: int, *, hidden: int, num_experts: int = 8, slots_per_expert: int | None = 1,
                 capacity_factor: float | None = None, num_tokens: int | None = None, noise_std: float = 0.0,
                 scale_init: float = 1.0, activation: str = "gelu"):
        super().__init__()
        self.config = SoftMoEConfig(num_experts=num_experts, slots_per_expert=slots_per_expert,
                                    capacity_factor=capacity_factor, num_tokens=num_tokens, noise_std=noise_std,
                                    scale_init=scale_init)
        self.num_experts = num_experts
        self.slots_per_expert = self.config.resolved_slots()
        # Phi: (D, E, S); any init works since it is L2-normalised (vmoe uses lecun_normal).
        self.phi = nn.Parameter(torch.randn(dim, num_experts, self.slots_per_expert) / dim**0.5)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.experts = Experts(num_experts, dim=dim, hidden=hidden, activation=activation)

    def router_logits(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, E*S): scale * <x/|x|, phi/|phi|> (Sec. 2.3), plus noise in training."""
        phi = l2_normalize(self.phi, dim=0).flatten(1) * self.scale  # (D, E*S)
        # <x/|x|, phi> computed as <x, phi> / |x|: the same numbers, with the row scaling applied to the
        # (B, T, E*S) logits instead of the (B, T, D) inputs (fewer element-wise operations when E*S < D).
        logits = _CosineLogits.apply(x, phi, 1e-6)
        if self.training and self.config.noise_std > 0:
            logits = logits + self.config.noise_std * torch.randn_like(logits)
        return logits

    def forward(self, x: Tensor, *, causal: bool = False) -> MoEOutput:
        if causal:
            raise ConfigError(
                "Soft MoE is not causal: every slot is a softmax-weighted mix of all tokens of the sequence, so a "
                "token's output would depend on later tokens. Use TokenChoiceMoE (kind='token_choice') in causal "
                "models.")
        b, t, d = x.shape
        e, s = self.num_experts, self.slots_per_expert
        logits = self.router_logits(x)  # (B, T, E*S)
        dispatch_weights = F.softmax(logits, dim=1)  # Eq. 1: normalised over tokens (columns)
        combine_weights = F.softmax(logits, dim=2)  # Eq. 2: normalised over all E*S slots (rows)
        slots = torch.bmm(dispatch_weights.transpose(1, 2), x)  # (B, E*S, D): X~ = D^T X
        # (B, E, S*D) <-> (E, B, S*D): each expert's S slots move as one contiguous S*D run (a 3-D copy, ~25%
        # faster here than the same permutation as a 4-D (B, E, S, D) one)
        slots = slots.view(b, e, s * d).transpose(0, 1).reshape(e, b * s, d)
        out = self.experts(slots).view(e, b, s * d).transpose(0, 1).reshape(b, e * s, d)
        y = torch.bmm(combine_weights, out)  # Eq. 2: Y = C Y~
        return MoEOutput(
            y=y,
            router_logits=logits,
            tokens_per_expert=dispatch_weights.detach().sum(dim=(0, 1)).view(e, s).sum(-1),
            dropped=torch.zeros(b, t, dtype=torch.bool, device=x.device),
            aux_loss=x.new_zeros(()),
            routing=SoftRouting(dispatch_weights=dispatch_weights, combine_weights=combine_weights),
        )


@dataclass
class SoftRouting:
    """The two weight matrices of one Soft MoE call, each (B, T, E*S)."""

    dispatch_weights: Tensor  # columns (over T) sum to 1
    combine_weights: Tensor  # rows (over E*S) sum to 1
