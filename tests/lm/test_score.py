import math
from types import SimpleNamespace

import pytest
import torch

from lmlab.errors import ConfigError, DataError
from lmlab.lm import score

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ids60():
    return torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(1))


class UniformLM(torch.nn.Module):
    """A 'model' whose logits are all zero: every token has probability 1/V."""

    def __init__(self, vocab_size: int, max_positions: int = 64):
        super().__init__()
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


@pytest.mark.parametrize("n", [2, 3, 5, 16, 17, 18, 33, 60, 100, 257])
@pytest.mark.parametrize("window,stride", [(2, 1), (2, 2), (4, 1), (4, 3), (8, 8), (16, 8), (16, 5), (64, 64)])
def test_windows_score_every_token_once(n, window, stride):
    windows = score.sliding_windows(n, window=window, stride=stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))  # in order, each once
    for k, w in enumerate(windows):
        assert w.begin == k * stride
        assert w.begin < w.score_from < w.end <= n
        assert 1 <= w.n_inputs <= window
        if k:
            assert w.score_from == windows[k - 1].end
        if w is not windows[-1]:
            assert w.n_inputs == window  # only the last window may be short


def test_windows_match_silo_batch_merged():
    # SILO's batch_merged for n=10, max_seq_length=4, stride=2: inputs ids[0:4], ids[2:6], ids[4:8], ids[6:9];
    # targets shifted by one; scored: 1-4, then the last 2 of each window, then the last 1.
    windows = score.sliding_windows(10, window=4, stride=2)
    assert [(w.inputs.start, w.inputs.stop) for w in windows] == [(0, 4), (2, 6), (4, 8), (6, 9)]
    assert [(w.score_from, w.end) for w in windows] == [(1, 5), (5, 7), (7, 9), (9, 10)]


@pytest.mark.parametrize("window,stride", [(1, 1), (0, 1), (8, 0), (8, 9), (8, -1)])
def test_bad_window_or_stride(window, stride):
    with pytest.raises(ConfigError, match="window|stride"):
        score.sliding_windows(100, window=window, stride=stride)


def test_window_beyond_model_positions(tiny, ids60):
    limit = tiny.model.config.max_position_embeddings
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        score.perplexity(tiny.model, ids60, window=limit + 1, stride=8)


def test_too_few_tokens(tiny):
    with pytest.raises(DataError):
        score.perplexity(tiny.model, [5], window=8, stride=4)


def test_perplexity_equals_naive_token_by_token(tiny, ids60):
    model = tiny.model
    result = score.perplexity(model, ids60, window=16, stride=8, batch_size=3)
    naive = torch.empty(59)
    with torch.no_grad():
        for w in score.sliding_windows(60, window=16, stride=8):
            for t in range(w.score_from, w.end):
                logits = model(ids60[None, w.begin:t]).logits[0, -1]
                naive[t - 1] = -torch.log_softmax(logits.float(), -1)[ids60[t]]
    torch.testing.assert_close(result.token_nll, naive, atol=1e-4, rtol=0)
    assert result.n_tokens == 59
    assert result.nll == pytest.approx(naive.double().sum().item(), abs=1e-3)
    assert result.ppl == pytest.approx(math.exp(result.nll / 59))


def test_batch_size_does_not_change_result(tiny, ids60):
    one = score.perplexity(tiny.model, ids60, window=16, stride=8, batch_size=1)
    four = score.perplexity(tiny.model, ids60, window=16, stride=8, batch_size=4)  # last batch padded
    torch.testing.assert_close(one.token_nll, four.token_nll, atol=1e-5, rtol=0)
    assert one.ppl == pytest.approx(four.ppl, rel=1e-5)


def test_stride_equal_window_is_independent_chunks(tiny, ids60):
    window = 16
    result = score.perplexity(tiny.model, ids60, window=window, stride=window, batch_size=2)
    # Non-overlapping chunks: inputs ids[kW:(k+1)W], targets shifted by one (nanoGPT-style evaluation).
    chunks = [score.token_logprobs(tiny.model, ids60[None, k:k + window + 1])[0] for k in range(0, 59, window)]
    torch.testing.assert_close(result.token_nll, -torch.cat(chunks), atol=1e-5, rtol=0)


def test_token_nll_sums_to_total(tiny, ids60):
    result = score.perplexity(tiny.model, ids60.tolist(), window=16, stride=4)
    assert result.token_nll.shape == (59,)
    assert result.nll == pytest.approx(result.token_nll.double().sum().item(), rel=1e-9)


def test_uniform_logits_give_vocab_size_perplexity(ids60):
    result = score.perplexity(UniformLM(vocab_size=300), ids60, window=16, stride=8, batch_size=4)
    assert result.ppl == pytest.approx(300, rel=1e-5)


def test_window_logprobs_align_with_targets(tiny, ids60):
    rows = list(score.iter_window_logprobs(tiny.model, ids60, window=16, stride=8, batch_size=4,
                                           output_hidden_states=True))
    assert [r.window for r in rows] == score.sliding_windows(60, window=16, stride=8)
    width = tiny.model.config.hidden_size
    for r in rows:
        w = r.window
        assert r.logprobs.shape == (w.n_scored, tiny.model.config.vocab_size)
        assert torch.equal(r.target_ids, ids60[w.score_from:w.end])
        torch.testing.assert_close(r.logprobs.exp().sum(-1), torch.ones(w.n_scored))
        assert r.hidden_states.shape == (w.n_scored, width)
        # the hidden states are the ones the LM head turned into these log-probabilities
        relogits = tiny.model.lm_head(r.hidden_states)
        torch.testing.assert_close(torch.log_softmax(relogits, -1), r.logprobs, atol=1e-5, rtol=0)


def test_window_hidden_states_without_the_head(tiny, ids60):
    kw = dict(window=16, stride=8, batch_size=4, output_hidden_states=True)
    full = list(score.iter_window_logprobs(tiny.model, ids60, **kw))
    head_rows = []
    handle = tiny.model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(o.shape[1]))
    try:
        bare = list(score.iter_window_logprobs(tiny.model, ids60, logprobs=False, **kw))
    finally:
        handle.remove()
    assert head_rows and set(head_rows) == {1}  # the LM head ran on one position per batch, not the window
    assert [r.window for r in bare] == [r.window for r in full]
    for a, b in zip(full, bare, strict=True):
        assert b.logprobs is None and torch.equal(a.target_ids, b.target_ids)
        torch.testing.assert_close(a.hidden_states, b.hidden_states)


def test_token_logprobs_left_padding_matches_unpadded(tiny, ids60):
    a, b = ids60[:20], ids60[30:42]
    plain_a = score.token_logprobs(tiny.model, a[None])[0]
    plain_b = score.token_logprobs(tiny.model, b[None])[0]
    pad = torch.full((8,), 257)
    batch = torch.stack([a, torch.cat([pad, b])])
    mask = torch.stack([torch.ones(20, dtype=torch.long), torch.cat([torch.zeros(8), torch.ones(12)]).long()])
    lp = score.token_logprobs(tiny.model, batch, attention_mask=mask)
    assert lp.shape == (2, 19)
    torch.testing.assert_close(lp[0], plain_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[1, 8:], plain_b, atol=1e-5, rtol=0)
    assert torch.all(lp[1, :8] == 0)


def test_perplexity_of_texts_separates_documents_with_eos(tiny):
    texts = ["hello world", "second doc"]
    tok = tiny.tokenizer
    result = score.perplexity_of_texts(tiny.model, tok, texts, window=16, stride=8)
    ids = tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok(texts[1], add_special_tokens=False)["input_ids"]
    expected = score.perplexity(tiny.model, ids, window=16, stride=8)
    assert result.n_tokens == len(ids) - 1
    assert result.nll == pytest.approx(expected.nll)


@pytest.mark.slow
def test_smollm2_perplexity_is_sensible(smollm2):
    torch.manual_seed(0)
    text = ("The museum opened its new wing on Saturday morning, and hundreds of visitors lined up outside "
            "before the doors opened. The exhibition focuses on the history of the city, from its founding "
            "as a small fishing village to the busy port it became in the nineteenth century. Curators spent "
            "three years collecting photographs, letters and tools donated by local families.")
    ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    real = score.perplexity(smollm2.model, ids, window=64, stride=32, batch_size=4)
    shuffled = [ids[0]] + [ids[1:][i] for i in torch.randperm(len(ids) - 1).tolist()]
    mixed = score.perplexity(smollm2.model, shuffled, window=64, stride=32, batch_size=4)
    assert math.isfinite(real.ppl)
    assert real.ppl < 100 < len(smollm2.tokenizer)
    assert real.ppl < mixed.ppl


def _gpt2_with_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=258, n_positions=64, bos_token_id=256,
                     eos_token_id=256)  # resid/embd/attn dropout 0.1 (GPT-2's defaults)
    return GPT2LMHeadModel(cfg)


def test_scores_ignore_dropout_of_a_model_left_in_train_mode():
    # a model left in train() (e.g. just after Trainer.fit) used to get a different perplexity on every call
    model = _gpt2_with_dropout().eval()
    ids = torch.randint(0, 258, (40,), generator=torch.Generator().manual_seed(1))
    ref = score.perplexity(model, ids, window=16, stride=8)
    ref_lp = score.token_logprobs(model, ids[None])
    model.train()
    for _ in range(2):
        assert torch.equal(score.perplexity(model, ids, window=16, stride=8).token_nll, ref.token_nll)
        assert torch.equal(score.token_logprobs(model, ids[None]), ref_lp)
    assert model.training and all(m.training for m in model.modules())  # the caller's mode is restored


def test_perplexity_command_refuses_a_negative_max_docs(tmp_path, capsys):
    from lmlab.cli import main

    (tmp_path / "t.txt").write_text("some text")
    assert main(["lm", "perplexity", "--model", "tiny:micro", "--data", str(tmp_path), "--max-docs", "-1"]) == 2
    err = capsys.readouterr().err  # islice's ValueError traceback
    assert "--max-docs must be at least 0, not -1" in err and len(err.strip().splitlines()) == 1, err
