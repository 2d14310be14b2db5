import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe import KINDS, MoEConfig, MoEOutput, build_mlp

torch.set_num_threads(1)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_shares_one_interface(kind):
    torch.manual_seed(0)
    layer = build_mlp(MoEConfig(kind=kind, num_experts=4), 8, hidden=16, num_tokens=10)
    x = torch.randn(3, 10, 8, requires_grad=True)
    out = layer(x)
    assert isinstance(out, MoEOutput)
    assert out.y.shape == x.shape
    assert out.dropped.shape == (3, 10) and out.dropped.dtype == torch.bool
    assert out.aux_loss.dim() == 0
    assert out.tokens_per_expert.shape == ((1,) if kind == "dense" else (4,))
    if out.router_logits is not None:
        assert out.router_logits.shape[:2] == (3, 10)
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown MLP kind"):
        MoEConfig(kind="switchy")


def test_active_flops_match_at_capacity_one():
    """With c = 1 every kind runs about T tokens (or slots) through experts per sequence, like dense."""
    t, e = 48, 8
    for kind in ("soft", "token_choice", "expert_choice"):
        layer = build_mlp(MoEConfig(kind=kind, num_experts=e, capacity_factor=1.0, batch_priority=False),
                          8, hidden=16, num_tokens=t)
        out = layer(torch.randn(1, t, 8))
        assert float(out.tokens_per_expert.sum()) <= t
