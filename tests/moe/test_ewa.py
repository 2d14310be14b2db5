import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe import DenseMLP, MoEConfig, RandomPartitionMoE, ViT, ViTConfig, collapse_experts, ewa_update_

torch.set_num_threads(1)


def _vit(**kw):
    torch.manual_seed(0)
    return ViT(ViTConfig(dim=16, depth=3, heads=2, mlp_hidden=32, patch_size=7,
                         moe=MoEConfig(kind="ewa", num_experts=4), moe_layers=2, **kw))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_update_preserves_experts_mean_and_moves_toward_others(beta):
    model = _vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    assert ewa_update_(model, beta) == 2
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.mean(0), before[n].mean(0), atol=1e-6, rtol=1e-5)
            e = p.shape[0]
            expected = (1 - beta) * before[n] + beta * (before[n].sum(0, keepdim=True) - before[n]) / (e - 1)
            torch.testing.assert_close(p, expected)


def test_update_shrinks_spread_between_experts():
    model = _vit()
    w = model.blocks[-1].mlp.experts.w1
    spread = (w - w.mean(0)).norm()
    ewa_update_(model, 0.2)
    assert (w - w.mean(0)).norm() < spread


def test_collapsed_model_equals_moe_model_when_experts_are_equal():
    model = _vit().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RandomPartitionMoE):
                for p in m.experts.parameters():
                    p.copy_(p[:1].expand_as(p))
    dense = collapse_experts(model)
    assert dense.config.moe is None and dense.config.moe_layers == 0
    assert not any(isinstance(m, RandomPartitionMoE) for m in dense.modules())
    assert all(isinstance(b.mlp, DenseMLP) for b in dense.blocks)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(dense(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in dense.parameters()) == sum(
        p.numel() for p in ViT(dense.config).parameters())  # same size as a plain ViT


def test_collapse_averages_experts():
    model = _vit()
    layer = model.blocks[-1].mlp
    dense = collapse_experts(model)
    torch.testing.assert_close(dense.blocks[-1].mlp.fc1.weight, layer.experts.w1.mean(0).T)


def test_random_partition_uses_every_token_once_and_balances():
    torch.manual_seed(0)
    layer = RandomPartitionMoE(6, hidden=12, num_experts=4)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(p[:1].expand_as(p))
    dense = layer.experts.average()
    x = torch.randn(3, 7, 6)  # 21 tokens over 4 experts: 6,5,5,5
    out = layer(x)
    torch.testing.assert_close(out.y, dense(x).y, atol=1e-6, rtol=1e-5)
    assert sorted(out.tokens_per_expert.tolist()) == [5, 5, 5, 6]


def test_beta_out_of_range_and_single_expert_refused():
    with pytest.raises(ConfigError):
        ewa_update_(_vit(), 1.5)
    with pytest.raises(ConfigError):
        RandomPartitionMoE(4, hidden=8, num_experts=1)
