import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe import Experts, TokenChoiceMoE, dispatch_combine, expert_capacity, top_k_routing

torch.set_num_threads(1)


def _random_cases(n=40, seed=0):
    rng = torch.Generator().manual_seed(seed)
    for _ in range(n):
        def draw(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=rng))

        g, t, e, k = draw(1, 3), draw(1, 20), draw(1, 6), draw(1, 3)
        yield g, t, e, min(k, e), [0.5, 1.0, 1.25, 2.0][draw(0, 3)], bool(draw(0, 1)), draw(0, 10_000)


@pytest.mark.parametrize("g,t,e,k,c,bpr,seed", list(_random_cases()))
def test_capacity_never_exceeded_and_positions_unique(g, t, e, k, c, bpr, seed):
    logits = torch.randn(g, t, e, generator=torch.Generator().manual_seed(seed))
    r = top_k_routing(logits, k=k, capacity_factor=c, batch_priority=bpr)
    assert r.capacity == max(1, min(t, math.ceil(k * c * t / e)))
    for gi in range(g):
        for ei in range(e):
            sel = (r.expert_index[gi] == ei) & r.kept[gi]
            pos = r.position[gi][sel]
            assert len(pos) <= r.capacity
            assert sorted(pos.tolist()) == list(range(len(pos)))  # kept positions are 0..n-1, no collisions
    assert int(r.tokens_per_expert.sum()) == int(r.kept.sum())


def test_batch_priority_keeps_the_highest_gate_tokens():
    torch.manual_seed(0)
    t, e = 12, 3
    logits = torch.randn(1, t, e)
    logits[..., 0] += 5.0  # everyone wants expert 0; capacity c=1, k=1 -> C = 4
    r = top_k_routing(logits, k=1, capacity_factor=1.0, batch_priority=True)
    assert r.capacity == 4
    to0 = r.expert_index[0, :, 0] == 0
    kept_gates = r.gates[0, :, 0][to0 & r.kept[0, :, 0]]
    dropped_gates = r.gates[0, :, 0][to0 & ~r.kept[0, :, 0]]
    assert len(kept_gates) == 4 and len(dropped_gates) > 0
    assert kept_gates.min() >= dropped_gates.max()
    # without BPR the first tokens in sequence order win instead
    r2 = top_k_routing(logits, k=1, capacity_factor=1.0, batch_priority=False)
    first = torch.nonzero(to0).flatten()[:4]
    assert r2.kept[0, first, 0].all() and int(r2.kept[0, :, 0][to0].sum()) == 4


def test_choice_order_serves_all_first_choices_before_second():
    logits = torch.tensor([[[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [2.0, 3.0, 0.0]]])  # token 0's 2nd choice = expert 1
    r = top_k_routing(logits, k=2, capacity=2, batch_priority=False, order="choice")
    # expert 1 is the 1st choice of tokens 1 and 2 -> token 0's 2nd choice (expert 1) is dropped
    assert not r.kept[0, 0, 1] and r.kept[0, 1, 0] and r.kept[0, 2, 0]
    r_tok = top_k_routing(logits, k=2, capacity=2, batch_priority=False, order="token")
    assert r_tok.kept[0, 0, 1] and not r_tok.kept[0, 2, 0]  # token order: token 0 first, token 2 loses


def test_token_order_is_causal():
    torch.manual_seed(1)
    logits = torch.randn(1, 10, 4)
    full = top_k_routing(logits, k=2, capacity=3, order="token", batch_priority=False)
    prefix = top_k_routing(logits[:, :6], k=2, capacity=3, order="token", batch_priority=False)
    assert torch.equal(full.kept[:, :6], prefix.kept) and torch.equal(full.position[:, :6], prefix.position)


def test_no_capacity_limit_equals_per_token_reference():
    torch.manual_seed(0)
    layer = TokenChoiceMoE(8, hidden=16, num_experts=4, k=2, capacity_factor=None, batch_priority=False).eval()
    x = torch.randn(2, 5, 8)
    out = layer(x)
    assert not out.dropped.any() and int(out.tokens_per_expert.sum()) == 2 * 5 * 2
    probs = layer.router(x).softmax(-1)
    ex = layer.experts
    for b in range(2):
        for t in range(5):
            gates, idx = probs[b, t].topk(2)
            ref = sum(g * (torch.nn.functional.gelu(x[b, t] @ ex.w1[i] + ex.b1[i]) @ ex.w2[i] + ex.b2[i])
                      for g, i in zip(gates, idx.tolist(), strict=True))
            torch.testing.assert_close(out.y[b, t], ref, atol=1e-5, rtol=1e-5)


def test_dropped_tokens_get_zero_output_and_are_reported():
    torch.manual_seed(0)
    layer = TokenChoiceMoE(8, hidden=16, num_experts=2, k=1, capacity_factor=0.5, batch_priority=False).eval()
    out = layer(torch.randn(1, 8, 8))
    assert out.dropped.any()
    assert torch.all(out.y[out.dropped] == 0)
    assert int(out.tokens_per_expert.sum()) == int((~out.dropped).sum())


def test_router_function_standalone_with_dispatch_combine():
    torch.manual_seed(0)
    experts = Experts(3, dim=4, hidden=8)
    x = torch.randn(2, 6, 4)
    r = top_k_routing(torch.randn(2, 6, 3), k=1, capacity=expert_capacity(6, 3, k=1, capacity_factor=1.0))
    y = dispatch_combine(x, r, experts)
    assert y.shape == x.shape
    assert r.dropped_assignments.shape == (2, 6)


def test_causal_refuses_batch_priority_and_aux_loss_is_balance_loss():
    layer = TokenChoiceMoE(8, hidden=16, num_experts=4, batch_priority=True)
    with pytest.raises(ConfigError, match="not causal"):
        layer(torch.randn(1, 4, 8), causal=True)
    causal_layer = TokenChoiceMoE(8, hidden=16, num_experts=4, batch_priority=False, balance_coef=0.01)
    out = causal_layer(torch.randn(2, 4, 8), causal=True)
    assert out.aux_loss > 0 and out.aux_loss.requires_grad


def test_gradients_reach_router():
    torch.manual_seed(0)
    layer = TokenChoiceMoE(8, hidden=16, num_experts=4, k=2, balance_coef=0.0)
    layer(torch.randn(2, 10, 8)).y.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
