import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe import SoftMoE

torch.set_num_threads(1)


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden=32, num_experts=4, slots_per_expert=2)
    args.update(kw)
    return SoftMoE(16, **args)


def test_dispatch_columns_and_combine_rows_sum_to_one():
    layer = _layer(scale_init=5.0)
    out = layer(torch.randn(3, 10, 16))
    r = out.routing
    assert r.dispatch_weights.shape == (3, 10, 8)
    torch.testing.assert_close(r.dispatch_weights.sum(1), torch.ones(3, 8))  # each slot: convex mix of tokens
    torch.testing.assert_close(r.combine_weights.sum(2), torch.ones(3, 10))  # each token: convex mix of slots
    assert not out.dropped.any()
    torch.testing.assert_close(out.tokens_per_expert, torch.full((4,), 3 * 2.0))


def test_permutation_equivariant_over_tokens():
    layer = _layer(scale_init=3.0)
    x = torch.randn(2, 12, 16)
    perm = torch.randperm(12)
    torch.testing.assert_close(layer(x[:, perm]).y, layer(x).y[:, perm], atol=1e-5, rtol=1e-5)


def test_sequences_are_independent_groups():
    layer = _layer()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x).y[1:2], layer(x[1:2]).y, atol=1e-5, rtol=1e-5)


def test_matches_algorithm_1_reference_loop():
    layer = _layer(scale_init=2.0)
    x = torch.randn(2, 5, 16)
    y = layer(x).y
    phi = layer.phi / layer.phi.norm(dim=0, keepdim=True)
    for b in range(2):
        xn = x[b] / x[b].norm(dim=-1, keepdim=True)
        logits = 2.0 * xn @ phi.flatten(1)  # (T, E*S)
        d = logits.softmax(0)
        c = logits.softmax(1)
        slots = (d.T @ x[b]).view(4, 2, 16)  # raw (un-normalised) inputs are dispatched
        outs = []
        ex = layer.experts
        for e in range(4):
            h = torch.nn.functional.gelu(slots[e] @ ex.w1[e] + ex.b1[e])
            outs.append(h @ ex.w2[e] + ex.b2[e])
        ref = c @ torch.cat(outs)
        torch.testing.assert_close(y[b], ref, atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_expert_slot_and_scale():
    layer = _layer()
    layer(torch.randn(2, 9, 16)).y.square().sum().backward()
    for g in (layer.experts.w1.grad, layer.experts.w2.grad, layer.experts.b1.grad):
        assert (g.flatten(1).abs().sum(1) > 0).all()
    assert (layer.phi.grad.abs().sum(0) > 0).all()
    assert layer.scale.grad is not None and layer.scale.grad.abs() > 0


def test_router_gradient_matches_autograd_of_the_normalised_formula():
    """The router's hand-written backward (_CosineLogits) against autograd through l2_normalize(x) @ phi."""
    from lmlab.moe.soft_moe import _CosineLogits, l2_normalize

    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _CosineLogits.apply(a, b, 1e-6), (x, phi))
    layer = _layer(scale_init=2.0).double()
    x1 = x.detach().clone().requires_grad_()
    layer(x1).y.square().sum().backward()
    grads = [x1.grad, layer.phi.grad, layer.scale.grad]
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    phi_n = l2_normalize(layer.phi, dim=0).flatten(1) * layer.scale
    layer.router_logits = lambda inp: l2_normalize(inp) @ phi_n  # the plain formula, all autograd
    layer(x2).y.square().sum().backward()
    for a, b in zip(grads, [x2.grad, layer.phi.grad, layer.scale.grad], strict=True):
        torch.testing.assert_close(a, b)


def test_causal_use_is_refused_with_reason():
    with pytest.raises(ConfigError, match="not causal"):
        _layer()(torch.randn(1, 4, 16), causal=True)


def test_slots_from_capacity_factor():
    layer = SoftMoE(16, hidden=32, num_experts=4, slots_per_expert=None, capacity_factor=1.0, num_tokens=49)
    assert layer.slots_per_expert == round(49 / 4)
    with pytest.raises(ConfigError):
        SoftMoE(16, hidden=32, num_experts=4, slots_per_expert=None)
    for bad in (0.0, -1.0):  # not silently one slot per expert
        with pytest.raises(ConfigError, match="capacity_factor must be > 0"):
            SoftMoE(16, hidden=32, num_experts=4, slots_per_expert=None, capacity_factor=bad, num_tokens=49)


def test_noise_only_in_training():
    layer = _layer(noise_std=1.0)
    x = torch.randn(1, 6, 16)
    layer.eval()
    torch.testing.assert_close(layer(x).y, layer(x).y)
    layer.train()
    assert not torch.allclose(layer(x).router_logits, layer(x).router_logits)


def test_parity_with_soft_moe_pytorch_where_semantics_coincide():
    """soft-moe-pytorch RMS-normalises x and the slots (logits = D * cos with unit gains) and dispatches the
    normalised x. With inputs of RMS 1 (|x| = sqrt(D)), our scale = D and the same weights, both compute the
    same function; elsewhere they differ by (a) the learnable per-feature gains vs our scalar scale and (b) the
    normalised vs raw dispatched values."""
    pytest.importorskip("soft_moe_pytorch")
    from soft_moe_pytorch import SoftMoE as PeerSoftMoE

    torch.manual_seed(0)
    d, e, s, t = 16, 4, 3, 12
    peer = PeerSoftMoE(d, num_slots=s, num_experts=e, expert_mult=2, offload_unused_experts_to_cpu=False)
    ours = SoftMoE(d, hidden=2 * d, num_experts=e, slots_per_expert=s, scale_init=float(d))
    with torch.no_grad():
        ours.phi.copy_(peer.slot_embeds.permute(2, 0, 1))  # (E, S, D) -> (D, E, S)
        for i, ff in enumerate(peer.experts.experts):
            ours.experts.w1[i].copy_(ff[0].weight.T)
            ours.experts.b1[i].copy_(ff[0].bias)
            ours.experts.w2[i].copy_(ff[3].weight.T)
            ours.experts.b2[i].copy_(ff[3].bias)
    x = torch.randn(2, t, d)
    x = x / x.norm(dim=-1, keepdim=True) * d**0.5  # RMS 1
    torch.testing.assert_close(ours(x).y, peer(x), atol=1e-4, rtol=1e-4)
    # Off that manifold the packages differ (documented above): scaling x changes theirs' dispatched values only.
    assert not torch.allclose(ours(3 * x).y, peer(3 * x), atol=1e-3)
