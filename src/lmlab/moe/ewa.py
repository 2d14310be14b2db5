"""Experts Weights Averaging: Huang, Ye, Huang, Li, Chen, He, Ouyang, "Experts Weights Averaging: A New General
Training Scheme for Vision Transformers" (arXiv 2308.06093).

Shapes: B batch, T tokens, D width, E experts, N = ceil(B*T / E) tokens per expert.

What is implemented:
- :class:`RandomPartitionMoE` ("RMoE" in the paper, Sec. 3.2): no router; the B*T tokens of a batch are
  shuffled and split uniformly among the E experts (each gets N or N-1 tokens, every token exactly one
  expert, weight 1), run as one batched matmul.
- :func:`ewa_update_` (Sec. 3.2, after every optimizer step): for each expert i,
      W_i <- (1 - beta) W_i + beta * mean_{j != i} W_j
  applied to every expert parameter (weights and biases). The experts' mean is unchanged
  (sum_i of the update = (1-beta) S + beta S), which tests/moe/test_ewa.py checks.
- :func:`collapse_experts` (Sec. 3.3): every RandomPartitionMoE becomes a DenseMLP whose weights are the
  experts' mean, giving the original ViT at the original inference cost.

Deviations: experts are initialised independently (like any MoE); the paper's share-rate schedule and its
choice of which FFNs to convert (we use the last ``moe_layers`` blocks of :class:`lmlab.moe.vit.ViT`) are
not reproduced verbatim: beta is a constant (``TrainConfig.ewa_beta``). In eval mode the MoE form still
routes randomly; the collapsed model is what EWA evaluates.
Official code: none found.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.moe.experts import Experts, MoEOutput


class RandomPartitionMoE(nn.Module):
    """EWA's training-time MoE: tokens go to experts by a random uniform partition (no router)."""

    def __init__(self, dim: int, *, hidden: int, num_experts: int = 4, activation: str = "gelu"):
        super().__init__()
        if num_experts < 2:
            raise ConfigError("EWA needs num_experts >= 2 (beta averages each expert with the others)")
        self.num_experts = num_experts
        self.experts = Experts(num_experts, dim=dim, hidden=hidden, activation=activation)

    def forward(self, x: Tensor, *, causal: bool = False) -> MoEOutput:
        b, t, d = x.shape
        e = self.num_experts
        n = b * t
        per_expert = math.ceil(n / e)
        perm = torch.randperm(n, device=x.device)
        pad = per_expert * e - n  # padding rows point at an extra zero row n whose outputs are discarded
        index = torch.cat([perm, perm.new_full((pad,), n)]).view(per_expert, e).T  # round-robin deal: (E, N)
        x_pad = torch.cat([x.reshape(n, d), x.new_zeros(1, d)])
        out = self.experts(x_pad[index])  # (E, N, D)
        y = out.new_zeros(n + 1, d).index_add(0, index.reshape(-1), out.reshape(-1, d))[:n].to(x.dtype)
        counts = torch.bincount(torch.arange(e, device=x.device).repeat_interleave(per_expert)[index.reshape(-1) < n],
                                minlength=e)
        return MoEOutput(y=y.view(b, t, d), router_logits=None, tokens_per_expert=counts,
                         dropped=torch.zeros(b, t, dtype=torch.bool, device=x.device), aux_loss=x.new_zeros(()))


@torch.no_grad()
def ewa_update_(model: nn.Module, beta: float) -> int:
    """W_i <- (1-beta) W_i + beta * mean_{j!=i} W_j for every RandomPartitionMoE in ``model``; returns how many.

    Call it after ``optimizer.step()`` (Sec. 3.2, Algorithm 1 of 2308.06093).
    """
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"EWA share rate beta must be in [0, 1], got {beta}")
    layers = [m for m in model.modules() if isinstance(m, RandomPartitionMoE)]
    for layer in layers:
        for p in layer.experts.parameters():
            e = p.shape[0]
            others_mean = (p.sum(0, keepdim=True) - p) / (e - 1)
            p.lerp_(others_mean, beta)
    return len(layers)


def collapse_experts(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each RandomPartitionMoE replaced by the dense MLP of its experts' mean (Sec. 3.3).

    A model with a ``collapsed_config()`` method (our ViT) gets that config, so the copy describes itself as
    the plain model it now is (and saves/loads as one).
    """
    collapsed = copy.deepcopy(model)
    for module in list(collapsed.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RandomPartitionMoE):
                setattr(module, child_name, child.experts.average())
    if hasattr(collapsed, "collapsed_config"):
        collapsed.config = collapsed.collapsed_config()
    return collapsed
