"""The expert bank shared by every MoE layer, the dense MLP they replace, and the layers' common output.

Shapes: B batch, T tokens, D width, H expert hidden width, E experts, N tokens (or slots) per expert.

- :class:`Experts`: E two-layer MLPs stored as stacked weights ``w1 (E, D, H)``, ``b1 (E, H)``,
  ``w2 (E, H, D)``, ``b2 (E, D)`` and run as one batched matmul (``torch.baddbmm``) over all experts,
  never a Python loop per expert. Input and output are ``(E, N, D)``. Routers (soft, token choice,
  expert choice, EWA's random partition, the pre-gated LM) only decide which rows go in.
- :class:`DenseMLP`: the ViT/Transformer MLP (``fc1 -> GELU -> fc2``) with the same initialisation as
  one expert, so "dense vs MoE" comparisons differ only in routing. It returns :class:`MoEOutput` too,
  so a host model swaps any layer in by name (:func:`lmlab.moe.layers.build_mlp`).
- :class:`MoEOutput`: what every layer returns (DESIGN.md's named result).

The weights' layout (E, D, H) is the one vmoe and most JAX MoE code use; ``Experts.average()`` gives the
dense MLP whose weights are the experts' mean (EWA's final collapse, arXiv 2308.06093 Sec. 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import ConfigError

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class MoEOutput:
    """One MoE (or dense) MLP call.

    y: (B, T, D) the layer's output (the residual is added by the host block).
    router_logits: (B, T, E) for token/expert choice, (B, T, E * slots_per_expert) for Soft MoE,
        None for dense and EWA's random partition.
    tokens_per_expert: (E,) how many token assignments each expert processed in this call, summed over
        the batch (float for Soft MoE: the dispatch mass, which is slots_per_expert per sequence).
    dropped: (B, T) bool, True where no expert processed the token at all (its MLP output is zero; only the
        residual carries it). Token choice can also drop some of a token's k > 1 assignments: see
        ``routing.kept``.
    aux_loss: scalar, the auxiliary loss the layer's config asks for (0 where none), already weighted.
    routing: the router's full decision (e.g. :class:`lmlab.moe.token_choice.TokenChoiceRouting`), or None.
    """

    y: Tensor
    router_logits: Tensor | None
    tokens_per_expert: Tensor
    dropped: Tensor
    aux_loss: Tensor
    routing: object | None = None


class Experts(nn.Module):
    """E independent MLPs ``x -> act(x W1_e + b1_e) W2_e + b2_e`` evaluated as one batched matmul.

    Initialisation matches ``nn.Linear`` (uniform in +-1/sqrt(fan_in) for weights and biases) for each
    expert separately, so an expert starts out distributed exactly like :class:`DenseMLP`.
    """

    def __init__(self, num_experts: int, *, dim: int, hidden: int, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ConfigError(f"Experts needs num_experts, dim, hidden >= 1, got {num_experts}, {dim}, {hidden}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """(E, N, D) -> (E, N, D): expert e applied to row block x[e]."""
        if x.dim() != 3 or x.shape[0] != self.num_experts:
            raise ValueError(f"Experts expects (E={self.num_experts}, N, D) input, got {tuple(x.shape)}")
        act = ACTIVATIONS[self.activation]
        if self.b1 is not None:
            h = act(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))
            return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)
        return torch.bmm(act(torch.bmm(x, self.w1)), self.w2)

    @torch.no_grad()
    def average(self) -> DenseMLP:
        """The dense MLP whose weights are the mean of the experts' (EWA's collapse, Sec. 3.3 of 2308.06093)."""
        mlp = DenseMLP(self.dim, hidden=self.hidden, bias=self.b1 is not None, activation=self.activation)
        mlp.fc1.weight.copy_(self.w1.mean(0).T)
        mlp.fc2.weight.copy_(self.w2.mean(0).T)
        if self.b1 is not None:
            mlp.fc1.bias.copy_(self.b1.mean(0))
            mlp.fc2.bias.copy_(self.b2.mean(0))
        return mlp.to(self.w1.device, self.w1.dtype)

    @torch.no_grad()
    def load_dense_(self, mlp: DenseMLP) -> Experts:
        """Set every expert to a copy of ``mlp`` (upcycling a dense checkpoint; used by tests)."""
        self.w1.copy_(mlp.fc1.weight.T.unsqueeze(0).expand_as(self.w1))
        self.w2.copy_(mlp.fc2.weight.T.unsqueeze(0).expand_as(self.w2))
        if self.b1 is not None:
            self.b1.copy_(mlp.fc1.bias.unsqueeze(0).expand_as(self.b1))
            self.b2.copy_(mlp.fc2.bias.unsqueeze(0).expand_as(self.b2))
        return self

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}"


class DenseMLP(nn.Module):
    """The Transformer MLP ``fc2(act(fc1(x)))``, returning :class:`MoEOutput` so it is swappable with MoEs."""

    def __init__(self, dim: int, *, hidden: int, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor, *, causal: bool = False) -> MoEOutput:
        b, t, _ = x.shape
        y = self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))
        return MoEOutput(
            y=y,
            router_logits=None,
            tokens_per_expert=torch.tensor([b * t], dtype=torch.float32, device=x.device),
            dropped=torch.zeros(b, t, dtype=torch.bool, device=x.device),
            aux_loss=x.new_zeros(()),
        )
