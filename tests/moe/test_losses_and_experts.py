import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe import DenseMLP, Experts, importance_loss, load_loss, router_z_loss, switch_balance_loss

torch.set_num_threads(1)


def test_switch_loss_is_one_at_perfect_balance_and_e_at_collapse():
    e = 4
    probs = torch.full((8, e), 1 / e)
    idx = torch.arange(8).remainder(e).unsqueeze(-1)
    assert switch_balance_loss(probs, idx).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1.0
    assert switch_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(e)


def test_importance_loss_zero_when_balanced_positive_otherwise():
    assert importance_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-9)
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 5)
    imp = p.sum(0)
    assert importance_loss(p).item() == pytest.approx((imp.std(unbiased=False) / imp.mean()).item() ** 2, rel=1e-5)


def test_load_loss_needs_noise_and_is_differentiable():
    clean = torch.randn(6, 4, requires_grad=True)
    noisy = clean.detach() + 0.3 * torch.randn(6, 4)
    loss = load_loss(clean, noisy, noise_std=0.3, k=1)
    loss.backward()
    assert loss.item() >= 0 and clean.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        load_loss(clean, noisy, noise_std=0.0, k=1)


def test_router_z_loss_value():
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_experts_batched_matmul_equals_per_expert_mlp():
    torch.manual_seed(0)
    ex = Experts(3, dim=5, hidden=7)
    x = torch.randn(3, 4, 5)
    y = ex(x)
    for e in range(3):
        ref = torch.nn.functional.gelu(x[e] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
        torch.testing.assert_close(y[e], ref)


def test_average_and_load_dense_roundtrip():
    torch.manual_seed(0)
    dense = DenseMLP(5, hidden=7)
    ex = Experts(4, dim=5, hidden=7).load_dense_(dense)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(ex.average()(x).y, dense(x).y)
    torch.testing.assert_close(ex(x.reshape(1, 6, 5).expand(4, 6, 5))[2], dense(x).y.reshape(6, 5))


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_is_hf_mixtral_loss_over_k(k):
    """The documented relation to Hugging Face's ``load_balancing_loss_func``: theirs = k * ours."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    probs = logits.softmax(-1)
    ours = switch_balance_loss(probs, probs.topk(k, dim=-1).indices)
    theirs = mixtral.load_balancing_loss_func((logits,), 4, k)
    torch.testing.assert_close(theirs, k * ours)
