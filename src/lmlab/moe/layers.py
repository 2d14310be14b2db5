"""One config and one factory for every MLP kind, so a host model swaps them by name.

Every layer built here is called as ``layer(x, causal=False)`` with x (B, T, D) and returns
:class:`lmlab.moe.experts.MoEOutput` (y, router_logits, tokens_per_expert, dropped, aux_loss, routing).

    kind            module                              paper
    dense           lmlab.moe.experts.DenseMLP          -
    soft            lmlab.moe.soft_moe.SoftMoE          2308.00951 (Soft MoE)
    token_choice    lmlab.moe.token_choice.TokenChoiceMoE   2106.05974 (V-MoE), baseline in 2308.00951
    expert_choice   lmlab.moe.expert_choice.ExpertChoiceMoE 2202.09368, baseline in 2308.00951
    ewa             lmlab.moe.ewa.RandomPartitionMoE    2308.06093 (EWA's training-time MoE)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from lmlab.errors import ConfigError

KINDS = ("dense", "soft", "token_choice", "expert_choice", "ewa")


@dataclass(frozen=True)
class MoEConfig:
    kind: str = "soft"  # dense | soft | token_choice | expert_choice | ewa
    num_experts: int = 8
    # soft: slots per expert; None -> round(capacity_factor * T / E) slots
    slots_per_expert: int | None = None
    # token_choice: C = ceil(k c T / E); expert_choice: C = round(c T / E); soft: total slots = c T
    capacity_factor: float | None = 1.0
    k: int = 1  # token_choice: experts per token
    batch_priority: bool = True  # token_choice: V-MoE's Batch Prioritized Routing
    noise_std: float | None = None  # token_choice: None -> 1/E (V-MoE); soft: None -> 0 (vmoe)
    balance_loss: str = "switch"  # token_choice: switch | importance_load | none
    balance_coef: float = 0.01  # Switch alpha
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE 1e-3); token/expert choice
    activation: str = "gelu"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown MLP kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {self.num_experts}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_mlp(config: MoEConfig | None, dim: int, *, hidden: int, num_tokens: int | None = None) -> nn.Module:
    """The MLP of one block: dense when ``config`` is None or kind='dense', else the configured MoE.

    ``num_tokens`` (T) is needed by Soft MoE when its slots come from a capacity factor.
    """
    from lmlab.moe.experts import DenseMLP

    if config is None or config.kind == "dense":
        return DenseMLP(dim, hidden=hidden, activation=config.activation if config else "gelu")
    c = config
    if c.kind == "soft":
        from lmlab.moe.soft_moe import SoftMoE

        slots = c.slots_per_expert
        if slots is None and (c.capacity_factor is None or num_tokens is None):
            raise ConfigError("Soft MoE needs slots_per_expert, or capacity_factor and the number of tokens")
        return SoftMoE(dim, hidden=hidden, num_experts=c.num_experts, slots_per_expert=slots,
                       capacity_factor=c.capacity_factor, num_tokens=num_tokens, noise_std=c.noise_std or 0.0,
                       activation=c.activation)
    if c.kind == "token_choice":
        from lmlab.moe.token_choice import TokenChoiceMoE

        return TokenChoiceMoE(dim, hidden=hidden, num_experts=c.num_experts, k=c.k, capacity_factor=c.capacity_factor,
                              batch_priority=c.batch_priority, noise_std=c.noise_std, balance_loss=c.balance_loss,
                              balance_coef=c.balance_coef, z_loss_coef=c.z_loss_coef, activation=c.activation)
    if c.kind == "expert_choice":
        from lmlab.moe.expert_choice import ExpertChoiceMoE

        if c.capacity_factor is None:
            raise ConfigError("expert choice needs a capacity_factor (C = round(c T / E))")
        return ExpertChoiceMoE(dim, hidden=hidden, num_experts=c.num_experts, capacity_factor=c.capacity_factor,
                               z_loss_coef=c.z_loss_coef, activation=c.activation)
    from lmlab.moe.ewa import RandomPartitionMoE

    return RandomPartitionMoE(dim, hidden=hidden, num_experts=c.num_experts, activation=c.activation)
