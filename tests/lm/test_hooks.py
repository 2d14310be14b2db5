import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.lm import hooks

torch.set_num_threads(1)

LAYER = "model.layers.0"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def no_hooks_left(model):
    """No hook of ours is registered (transformers keeps its own output-recording hooks on some modules)."""
    ours = [fn for m in model.modules() for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            if getattr(fn, "__module__", None) == hooks.__name__]
    return not ours


def test_capture_matches_output_hidden_states(tiny, ids):
    with hooks.capture(tiny.model, [LAYER, "model.layers.1"]) as cap, torch.no_grad():
        out = tiny.model(ids, output_hidden_states=True)
    assert set(cap) == {LAYER, "model.layers.1"}
    torch.testing.assert_close(cap[LAYER], out.hidden_states[1], atol=0, rtol=0)
    assert not cap[LAYER].requires_grad
    assert no_hooks_left(tiny.model)


def test_capture_input_and_keep_all(tiny, ids):
    with hooks.capture(tiny.model, "model.layers.1", what="input", keep_all=True) as cap_in, \
            hooks.capture(tiny.model, LAYER) as cap_out:
        logits(tiny.model, ids)
        logits(tiny.model, ids[:1])
    seen = cap_in["model.layers.1"]
    assert [t.shape[0] for t in seen] == [2, 1]
    torch.testing.assert_close(seen[1], cap_out[LAYER])  # layer 1's input is layer 0's output
    assert no_hooks_left(tiny.model)


def test_capture_before_forward_says_what_to_do(tiny):
    with hooks.capture(tiny.model, LAYER) as cap:
        pass
    with pytest.raises(KeyError, match="inside the"):
        cap[LAYER]


def test_modify_identity_and_zeros(tiny, ids):
    base = logits(tiny.model, ids)
    with hooks.modify(tiny.model, {LAYER: lambda h: h}):
        same = logits(tiny.model, ids)
    with hooks.modify(tiny.model, {LAYER: torch.zeros_like}):
        zeroed = logits(tiny.model, ids)
    torch.testing.assert_close(same, base, atol=0, rtol=0)
    assert not torch.allclose(zeroed, base)
    assert no_hooks_left(tiny.model)
    torch.testing.assert_close(logits(tiny.model, ids), base, atol=0, rtol=0)


def test_modify_input_equals_modify_previous_output(tiny, ids):
    with hooks.modify(tiny.model, {"model.layers.1": lambda h: 2 * h}, where="input"):
        via_input = logits(tiny.model, ids)
    with hooks.modify(tiny.model, {LAYER: lambda h: 2 * h}):
        via_output = logits(tiny.model, ids)
    torch.testing.assert_close(via_input, via_output)


def test_handles_removed_when_body_raises(tiny, ids):
    mlp = tiny.model.get_submodule("model.layers.1.mlp")  # a module transformers itself never hooks
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.capture(tiny.model, "model.layers.1.mlp"), \
                hooks.modify(tiny.model, {"model.layers.1.mlp": torch.zeros_like}, where="input"):
            assert len(mlp._forward_hooks) == 1 and len(mlp._forward_pre_hooks) == 1
            logits(tiny.model, ids)
            raise RuntimeError("boom")
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks
    assert no_hooks_left(tiny.model)


def test_handles_removed_when_hook_raises(tiny, ids):
    def bad(h):
        raise ValueError("bad edit")

    with pytest.raises(ValueError, match="bad edit"), hooks.modify(tiny.model, {LAYER: bad}):
        logits(tiny.model, ids)
    assert no_hooks_left(tiny.model)


def test_unknown_name_suggests_close_ones(tiny):
    with pytest.raises(ConfigError, match=r"model\.layers\.0"):
        hooks.resolve(tiny.model, "model.layer.0")
    with pytest.raises(ConfigError, match="model.layers.9"), hooks.capture(tiny.model, [LAYER, "model.layers.9"]):
        pass
    assert no_hooks_left(tiny.model)  # the good name was not left hooked either


def test_layer_names_glob_per_component(tiny):
    assert hooks.layer_names(tiny.model, "model.layers.*") == ["model.layers.0", "model.layers.1"]
    assert hooks.layer_names(tiny.model, "model.layers.*.mlp") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(ConfigError):
        hooks.layer_names(tiny.model, "transformer.h.*")


def test_add_vector_coeff_zero_is_identity(tiny, ids):
    base = logits(tiny.model, ids)
    vector = torch.randn(tiny.model.config.hidden_size)
    with hooks.add_vector(tiny.model, LAYER, vector, coeff=0.0):
        steered = logits(tiny.model, ids)
    torch.testing.assert_close(steered, base, atol=0, rtol=0)


def test_add_vector_is_causal(tiny, ids):
    base = logits(tiny.model, ids)
    vector = 5 * torch.randn(tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with hooks.add_vector(tiny.model, LAYER, vector, positions=[5, 7]):
        steered = logits(tiny.model, ids)
    torch.testing.assert_close(steered[:, :5], base[:, :5], atol=0, rtol=0)
    changed = (steered - base).abs().amax(-1)  # (B, T)
    assert torch.all(changed[:, 5:] > 1e-4)


def test_add_vector_adds_exactly_at_positions(tiny, ids):
    vector = torch.ones(tiny.model.config.hidden_size)
    with hooks.capture(tiny.model, LAYER) as before:
        logits(tiny.model, ids)
    # register the capture after add_vector so it sees the steered output
    with hooks.add_vector(tiny.model, LAYER, vector, positions=slice(2, 4), coeff=0.5), \
            hooks.capture(tiny.model, LAYER) as after:
        logits(tiny.model, ids)
    diff = after[LAYER] - before[LAYER]
    torch.testing.assert_close(diff[:, 2:4], torch.full_like(diff[:, 2:4], 0.5))
    assert torch.all(diff[:, :2] == 0) and torch.all(diff[:, 4:] == 0)


def test_add_vector_skips_positions_a_call_does_not_have(tiny, ids):
    """A decoding step sees T=1: steering prompt position 5 leaves it alone instead of raising IndexError."""
    vector = torch.ones(tiny.model.config.hidden_size)
    short = ids[:, :3]
    base = logits(tiny.model, short)
    with hooks.add_vector(tiny.model, LAYER, vector, positions=5):
        torch.testing.assert_close(logits(tiny.model, short), base, atol=0, rtol=0)
    with hooks.capture(tiny.model, LAYER) as before:
        logits(tiny.model, short)
    with hooks.add_vector(tiny.model, LAYER, vector, positions=[1, 5, -9]), \
            hooks.capture(tiny.model, LAYER) as after:
        logits(tiny.model, short)
    diff = after[LAYER] - before[LAYER]
    torch.testing.assert_close(diff[:, 1], torch.ones_like(diff[:, 1]))
    assert torch.all(diff[:, [0, 2]] == 0)


def test_add_vector_rejects_wrong_width(tiny, ids):
    with pytest.raises(ConfigError, match="expected"), hooks.add_vector(tiny.model, LAYER, torch.ones(3)):
        logits(tiny.model, ids)
    assert no_hooks_left(tiny.model)


def test_a_shared_module_resolves_by_each_of_its_names():
    # named_modules() lists a shared (tied / aliased) module once: its second name used to be "no module named"
    class Aliased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(4, 4)
            self.shared = self.enc

        def forward(self, x):
            return self.shared(self.enc(x))

    m = Aliased()
    assert hooks.resolve(m, "shared") is m.enc
    with hooks.capture(m, "shared", keep_all=True) as cap:
        m(torch.ones(1, 4))
    assert len(cap["shared"]) == 2  # one module, called twice
