"""Pre-gated MoE LM (arXiv 2308.12066): the pre-gate of block i routes block i+1; both variants train."""

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.moe.pregated import PreGatedMoEConfig, PreGatedMoEForCausalLM, build, routing_from_logits
from lmlab.moe.token_choice import top_k_routing

torch.set_num_threads(1)

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, expert_hidden_size=64, num_experts=4,
             num_experts_per_tok=2, max_position_embeddings=64)


def _model(pregated: bool, seed: int = 0, **kw) -> PreGatedMoEForCausalLM:
    return build(pregated=pregated, vocab_size=50, seed=seed, **{**SMALL, **kw})


def test_gate_layout_and_same_size():
    conv, pre = _model(False), _model(True)
    assert all(b.router is not None and b.pregate is None for b in conv.layers)
    assert pre.layers[0].router is not None  # the first block keeps its own router
    assert all(b.router is None for b in pre.layers[1:])
    assert all(b.pregate is not None for b in pre.layers[:-1])
    assert pre.layers[-1].pregate is None  # the last block's pre-gate would be unused
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in pre.parameters())


def test_pregate_of_block_i_selects_block_i_plus_1_experts():
    model = _model(True)
    ids = torch.randint(0, 50, (2, 12))
    inputs = {}
    hooks = [blk.mlp_norm.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out))
             for i, blk in enumerate(model.layers)]
    with torch.no_grad():
        out = model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert torch.equal(out.router_logits[0], model.layers[0].router(inputs[0]))
    for i in range(len(model.layers) - 1):
        assert torch.equal(out.router_logits[i + 1], model.layers[i].pregate(inputs[i]))
    # changing block 0's pre-gate changes block 1's routing but not block 0's
    with torch.no_grad():
        model.layers[0].pregate.weight.mul_(-1)
        out2 = model(input_ids=ids)
    assert torch.equal(out2.router_logits[0], out.router_logits[0])
    assert not torch.equal(out2.router_logits[1], out.router_logits[1])


def test_routing_matches_issue5_router_without_drops():
    logits = torch.randn(2, 7, 4)
    r = routing_from_logits(logits, k=2, renormalize=True)
    ref = top_k_routing(logits, k=2, renormalize=True)
    assert r.kept.all()
    assert torch.equal(r.expert_index, ref.expert_index) and torch.equal(r.gates, ref.gates)
    assert torch.allclose(r.gates.sum(-1), torch.ones(2, 7))
    assert r.capacity == int(ref.position.max()) + 1 <= 7


def test_balance_loss_reaches_gates_through_logits_only():
    """The Trainer differentiates only CE(logits): the aux loss must still train the gates (Megatron's trick)."""
    model = _model(True).train()
    ids = torch.randint(0, 50, (2, 10))
    out = model(input_ids=ids)
    (out.logits * 0).sum().backward()  # zero LM gradient: what remains is the balance loss's
    via_logits = model.layers[0].router.weight.grad.clone()
    model.zero_grad()
    model(input_ids=ids).aux_loss.backward()
    assert via_logits.abs().sum() > 0
    assert torch.allclose(via_logits, model.layers[0].router.weight.grad)


def test_pregate_trains_end_to_end():
    model = _model(True).train()
    ids = torch.randint(0, 50, (2, 10))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for blk in model.layers[:-1]:
        assert blk.pregate.weight.grad is not None and blk.pregate.weight.grad.abs().sum() > 0


def test_trainer_and_reload(tmp_path):
    from lmlab.lm import models
    from lmlab.lm.data import TokenShards, build_token_shards
    from lmlab.lm.tokenizer import byte_tokenizer
    from lmlab.lm.train import TrainConfig, Trainer

    tok = byte_tokenizer()
    texts = [f"the quick brown fox {i} jumps over the lazy dog. " * 8 for i in range(40)]
    folders = build_token_shards(texts, tok, tmp_path / "tok", validation_fraction=0.1)
    model = build(pregated=True, vocab_size=len(tok), seed=0, **SMALL)
    cfg = TrainConfig(seq_len=32, batch_size=4, max_steps=6, warmup_steps=1, eval_every=6, eval_batches=2,
                      save_every=0, log_every=3, lr=3e-3)
    res = Trainer(model, tok, TokenShards(folders["train"]), cfg, tmp_path / "run",
                  validation=TokenShards(folders["validation"]), progress=False).fit()
    assert res.step == 6 and res.eval_loss is not None and res.eval_loss < 5.6  # ln(259) = 5.56 at random
    loaded = models.load(str(tmp_path / "run" / "model"))  # AutoModelForCausalLM resolves our config
    assert isinstance(loaded.model, PreGatedMoEForCausalLM) and loaded.model.config.pregated
    ids = torch.randint(0, len(tok), (1, 16))
    model.cpu().eval()  # the Trainer moved it to a GPU if there is one
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError):
        PreGatedMoEForCausalLM(PreGatedMoEConfig(hidden_size=30, num_attention_heads=4))
    with pytest.raises(ConfigError):
        PreGatedMoEForCausalLM(PreGatedMoEConfig(num_experts=4, num_experts_per_tok=5))
    model = _model(False)
    with pytest.raises(ConfigError):
        model(input_ids=torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    """Rotary cos/sin are float32: they must not promote q, k past v's half dtype (attention refuses the mix)."""
    model = _model(True)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        for gate in (g for blk in model.layers for g in (blk.router, blk.pregate) if g is not None):
            gate.weight.mul_(30)  # decisive gates: near-uniform probabilities would tie in half precision
        ref = model(input_ids=ids).logits
        out = model.to(dtype)(input_ids=ids)
    assert out.logits.dtype == dtype
    err = (out.logits.float() - ref).norm() / ref.norm()  # half rounding, not garbage
    assert err < 0.03, float(err)


def test_labels_loss_counts_the_balance_gradient_once():
    """``model(labels=).loss`` and the Trainer's CE(logits) both give CE's gradient plus the balance loss's, once."""
    import torch.nn.functional as F

    model = _model(True, router_aux_loss_coef=1.0).train()  # a big coefficient: a double count is plain to see
    ids = torch.randint(0, 50, (2, 10))

    def grad(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return model.layers[0].router.weight.grad.clone()

    def ce():
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 50).float(), ids[:, 1:].reshape(-1))

    g_labels = grad(lambda: model(input_ids=ids, labels=ids).loss)
    g_trainer = grad(ce)  # the balance loss rides on the logits' gradient
    g_aux = grad(lambda: model(input_ids=ids).aux_loss)
    model.eval()  # no folding in eval mode: CE's own gradient
    g_ce = grad(ce)
    assert g_aux.abs().max() > 1e-3
    torch.testing.assert_close(g_labels, g_ce + g_aux)
    torch.testing.assert_close(g_trainer, g_ce + g_aux)
