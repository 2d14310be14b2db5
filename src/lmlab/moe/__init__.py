"""Mixtures of experts: Soft MoE, token-choice and expert-choice routing, a ViT to host them, and EWA.

Public API (other families import only these names):

- layers, all ``layer(x (B, T, D), causal=False) -> MoEOutput``: :class:`SoftMoE`, :class:`TokenChoiceMoE`,
  :class:`ExpertChoiceMoE`, :class:`RandomPartitionMoE` (EWA), :class:`DenseMLP`; :class:`MoEConfig` +
  :func:`build_mlp` build any of them by name.
- reusable parts: :class:`Experts` (E MLPs as (E, D, H) weights, one batched matmul), :func:`top_k_routing`
  (standalone token-choice router with capacity dropping) and :func:`dispatch_combine`,
  :func:`expert_choice_routing`, the auxiliary losses in :mod:`lmlab.moe.losses`.
- pre-gated MoE LM (issue 6): :class:`PreGatedMoEForCausalLM`; offloaded inference in :mod:`lmlab.moe.offload`.
- EWA: :func:`ewa_update_`, :func:`collapse_experts`.
- ViT: :class:`ViT`, :class:`ViTConfig`; training: :class:`TrainConfig`, :func:`train_classifier`,
  :func:`evaluate`, :func:`save_model`, :func:`load_model`; data: :func:`load_fashion_mnist`.
"""

from lmlab.moe.ewa import RandomPartitionMoE, collapse_experts, ewa_update_
from lmlab.moe.expert_choice import ExpertChoiceMoE, ExpertChoiceRouting, expert_choice_capacity, expert_choice_routing
from lmlab.moe.experts import DenseMLP, Experts, MoEOutput
from lmlab.moe.layers import KINDS, MoEConfig, build_mlp
from lmlab.moe.losses import importance_loss, load_loss, router_z_loss, switch_balance_loss
from lmlab.moe.pregated import PreGatedMoEConfig, PreGatedMoEForCausalLM  # registers with AutoModelForCausalLM
from lmlab.moe.soft_moe import SoftMoE, SoftRouting
from lmlab.moe.token_choice import TokenChoiceMoE, TokenChoiceRouting, dispatch_combine, expert_capacity, top_k_routing
from lmlab.moe.vit import ViT, ViTConfig, ViTOutput

__all__ = [
    "KINDS", "DenseMLP", "ExpertChoiceMoE", "ExpertChoiceRouting", "Experts", "MoEConfig", "MoEOutput",
    "PreGatedMoEConfig", "PreGatedMoEForCausalLM",
    "RandomPartitionMoE", "SoftMoE", "SoftRouting", "TokenChoiceMoE", "TokenChoiceRouting", "ViT", "ViTConfig",
    "ViTOutput", "build_mlp", "collapse_experts", "dispatch_combine", "evaluate", "ewa_update_",
    "expert_capacity", "expert_choice_capacity", "expert_choice_routing", "importance_loss", "load_fashion_mnist",
    "load_loss", "load_model", "router_z_loss", "save_model", "switch_balance_loss", "top_k_routing",
    "train_classifier", "TrainConfig",
]


def __getattr__(name):  # training/data helpers import lmlab.lm; load them on first use
    if name in ("TrainConfig", "train_classifier", "evaluate", "save_model", "load_model"):
        from lmlab.moe import train

        return getattr(train, name)
    if name == "load_fashion_mnist":
        from lmlab.moe.data import load_fashion_mnist

        return load_fashion_mnist
    raise AttributeError(name)
