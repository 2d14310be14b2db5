"""Auxiliary router losses, as functions beside the layers (not inside a training loop).

Shapes: N tokens (any leading dims are flattened), E experts, k choices per token.

- :func:`importance_loss`: V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts",
  arXiv 2106.05974, Appendix A, Eq. 7-8): CV^2 of Importance_e = sum over tokens of the router probability of e.
- :func:`load_loss`: V-MoE Appendix A (Eq. 9-12): CV^2 of Load_e = sum over tokens of the probability that
  e is selected if only e's noise were re-sampled, 1 - Phi((threshold_k - logit_e) / noise_std), where
  threshold_k is the token's k-th largest noisy logit. Needs the noise std the router used (> 0).
- :func:`switch_balance_loss`: Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, Eq. 4-6):
  E * sum_e f_e * P_e, f_e the fraction of (pre-capacity) assignments to e, P_e the mean router probability.
  1.0 at perfect balance; top-k assignments are all counted, with f normalised by N*k (f sums to 1, Switch's
  definition at k = 1). Hugging Face's Mixtral ``load_balancing_loss_func`` normalises f by N only, so its value
  is k times ours (k at perfect balance): a coefficient a there weighs like k*a here.
- :func:`router_z_loss`: ST-MoE (Zoph et al. 2022, arXiv 2202.08906, Eq. 5): mean over tokens of
  logsumexp(logits)^2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmlab.errors import ConfigError


def _cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation std(v)^2 / mean(v)^2 (population std, V-MoE Eq. 8)."""
    return v.var(unbiased=False) / (v.mean().square() + eps)


def importance_loss(router_probs: Tensor) -> Tensor:
    """V-MoE Eq. 7-8. ``router_probs`` (..., E): softmax of the router logits."""
    importance = router_probs.reshape(-1, router_probs.shape[-1]).sum(0)
    return _cv_squared(importance)


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, *, noise_std: float, k: int) -> Tensor:
    """V-MoE Eq. 9-12 from the logits before and after the router's Gaussian noise, each (..., E)."""
    if noise_std <= 0:
        raise ConfigError("load_loss needs the router's noise_std > 0 (V-MoE's load is defined through the noise)")
    clean = clean_logits.reshape(-1, clean_logits.shape[-1])
    noisy = noisy_logits.reshape(-1, noisy_logits.shape[-1])
    threshold = noisy.topk(k, dim=-1).values[:, -1:]  # (N, 1): the k-th largest noisy logit, Eq. 10
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    p = 1.0 - normal.cdf((threshold - clean) / noise_std)  # Eq. 11
    return _cv_squared(p.sum(0))  # Eq. 12


def switch_balance_loss(router_probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Eq. 4: ``router_probs`` (..., E), ``expert_index`` (..., k) the router's choices (before capacity)."""
    num_experts = router_probs.shape[-1]
    probs = router_probs.reshape(-1, num_experts)
    idx = expert_index.reshape(-1)
    f = torch.bincount(idx, minlength=num_experts).to(probs.dtype) / idx.numel()  # Eq. 5
    p = probs.mean(0)  # Eq. 6
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE Eq. 5: mean_x logsumexp_e(logits)^2; keeps router logits small for numerical stability."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
