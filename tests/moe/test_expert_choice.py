import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe import ExpertChoiceMoE, expert_choice_capacity

torch.set_num_threads(1)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_every_expert_takes_exactly_c_distinct_tokens(c):
    torch.manual_seed(0)
    layer = ExpertChoiceMoE(8, hidden=16, num_experts=4, capacity_factor=c)
    out = layer(torch.randn(3, 10, 8))
    cap = expert_choice_capacity(10, 4, c)
    r = out.routing
    assert r.token_index.shape == (3, 4, cap)
    for g in range(3):
        for e in range(4):
            assert len(set(r.token_index[g, e].tolist())) == cap
    assert out.tokens_per_expert.tolist() == [3 * cap] * 4
    taken = torch.zeros(3, 10, dtype=torch.bool)
    for g in range(3):
        taken[g, r.token_index[g].flatten()] = True
    assert torch.equal(out.dropped, ~taken)


def test_output_matches_reference_loop():
    torch.manual_seed(0)
    layer = ExpertChoiceMoE(8, hidden=16, num_experts=3, capacity_factor=1.5)
    x = torch.randn(2, 6, 8)
    out = layer(x)
    probs = layer.router(x).softmax(-1)
    ex = layer.experts
    ref = torch.zeros_like(x)
    for b in range(2):
        for e in range(3):
            gates, idx = probs[b, :, e].topk(3)
            for g, t in zip(gates, idx.tolist(), strict=True):
                ref[b, t] += g * (torch.nn.functional.gelu(x[b, t] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e])
    torch.testing.assert_close(out.y, ref, atol=1e-5, rtol=1e-5)


def test_causal_refused():
    with pytest.raises(ConfigError, match="not causal"):
        ExpertChoiceMoE(8, hidden=16, num_experts=2)(torch.randn(1, 4, 8), causal=True)
