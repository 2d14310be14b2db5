"""LocalHFBackend against hand computations on the tiny random Llama; get_backend's spec parsing."""

import copy
import json

import pytest
import torch

from lmlab.errors import BackendError
from lmlab.lm.backends import (
    Backend,
    Completion,
    LocalHFBackend,
    LogLikelihood,
    OpenAIBackend,
    chat_prompt,
    get_backend,
    move_trailing_whitespace,
    plain_chat_prompt,
)

torch.set_num_threads(1)

PROMPTS = ["Hello", "xyz", "The cat sat on the", "a"]


@pytest.fixture(scope="module")
def backend(tiny):
    return LocalHFBackend(tiny.model, tiny.tokenizer, batch_size=3)  # 3 < len(PROMPTS): several padded batches


def manual_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache, no padding."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def hand_loglikelihood(model, ids: list[int], k: int) -> tuple[float, bool]:
    """Sum of log-softmax of the last k tokens of ids given the ones before, and whether each is the argmax."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    positions = range(len(ids) - k - 1, len(ids) - 1)
    total = sum(float(logp[t, ids[t + 1]]) for t in positions)
    return total, all(int(logp[t].argmax()) == ids[t + 1] for t in positions)


def test_greedy_equals_manual_loop_and_is_deterministic(backend, tiny):
    results = backend.generate(PROMPTS, max_tokens=6)
    assert results == backend.generate(PROMPTS, max_tokens=6)
    for prompt, (c,) in zip(PROMPTS, results, strict=True):
        ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = manual_greedy(tiny.model, ids, 6)
        assert list(c.token_ids) == expected
        assert c.text == tiny.tokenizer.decode(expected)
        assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (len(prompt.encode()), 6, "length")


def test_batched_generation_equals_one_prompt_at_a_time(backend):
    assert backend.generate(PROMPTS, max_tokens=8) == [backend.generate([p], max_tokens=8)[0] for p in PROMPTS]


def test_eos_stops_generation(tiny):
    b = LocalHFBackend(tiny.model, tiny.tokenizer)
    b.eos_token_ids = [tiny.tokenizer.convert_tokens_to_ids("o")]  # greedy after "Hello" is "o" (test above)
    ((c,),) = b.generate(["Hello"], max_tokens=5)
    assert (c.text, c.completion_tokens, c.finish_reason) == ("", 0, "stop")


def test_stop_string_truncates_text_and_counts_kept_tokens(backend):
    kw = dict(max_tokens=24, temperature=1.0, seed=3)
    ((full,),) = backend.generate(["The"], **kw)
    # a printable ASCII character that first occurs a few characters in
    i = next(i for i, ch in enumerate(full.text) if i >= 3 and ch.isascii() and ch.isprintable()
             and full.text.index(ch) == i)
    ((cut,),) = backend.generate(["The"], stop=["never there", full.text[i]], **kw)
    assert cut.text == full.text[:i] and cut.finish_reason == "stop"
    assert cut.completion_tokens == len(cut.token_ids) < full.completion_tokens
    assert cut.token_ids == full.token_ids[:cut.completion_tokens]
    # the kept tokens are exactly those needed to spell the kept text
    assert backend.decode(cut.token_ids).startswith(cut.text)
    assert len(backend.decode(cut.token_ids[:-1])) < len(cut.text)
    ((same,),) = backend.generate(["The"], stop=["never there"], **kw)
    assert same == full


def test_sampling_returns_n_seeded_completions(backend):
    a = backend.generate(PROMPTS[:2], n=3, max_tokens=8, temperature=1.0, seed=1)
    assert [len(row) for row in a] == [3, 3]
    assert all(c.completion_tokens == 8 and c.finish_reason == "length" for row in a for c in row)
    assert len({c.text for c in a[0]}) == 3  # random model, 8 tokens from ~258: distinct
    assert a == backend.generate(PROMPTS[:2], n=3, max_tokens=8, temperature=1.0, seed=1)
    assert a != backend.generate(PROMPTS[:2], n=3, max_tokens=8, temperature=1.0, seed=2)
    greedy = backend.generate(["Hello"], n=3, max_tokens=4)[0]
    assert len(greedy) == 3 and len(set(greedy)) == 1


def test_loglikelihood_equals_hand_computation(backend, tiny):
    ll = backend.loglikelihood("Hello", " world")
    ids = tiny.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    expected, greedy = hand_loglikelihood(tiny.model, ids, 6)
    assert ll.num_tokens == 6 and ll.is_greedy == greedy
    assert ll.logprob == pytest.approx(expected, abs=1e-4)


def test_empty_context_is_scored_after_the_bos_token(backend, tiny):
    ll = backend.loglikelihood("", "abc")
    ids = [tiny.tokenizer.bos_token_id] + tiny.tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert ll.num_tokens == 3
    assert ll.logprob == pytest.approx(hand_loglikelihood(tiny.model, ids, 3)[0], abs=1e-4)


def test_trailing_whitespace_moves_to_the_continuation(backend):
    assert move_trailing_whitespace("Q: x \n", "A") == ("Q: x", " \nA")
    assert backend.loglikelihood("Hello ", "world") == backend.loglikelihood("Hello", " world")


def test_batched_loglikelihood_equals_unbatched(backend):
    pairs = [("Hello", " world"), ("a", "b"), ("The cat sat on the", " mat."), ("", "xyz"), ("héllo", " wörld"),
             ("1 2 3", " 4")]
    batched = backend.loglikelihood_batch(pairs)
    for got, pair in zip(batched, pairs, strict=True):
        one = backend.loglikelihood(*pair)
        assert got.logprob == pytest.approx(one.logprob, abs=1e-4)
        assert (got.is_greedy, got.num_tokens) == (one.is_greedy, one.num_tokens)


def test_own_greedy_continuation_is_greedy(backend):
    for prompt in PROMPTS[:3]:
        ((c,),) = backend.generate([prompt], max_tokens=5)
        ll = backend.loglikelihood(prompt, c.text)
        assert ll.is_greedy and ll.num_tokens == 5
    assert not backend.loglikelihood("Hello", "ooox").is_greedy  # "x" is not what the model continues with


def test_token_logprobs_top_k_contains_the_greedy_token(backend, tiny):
    ids = tiny.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    (s,) = backend.token_logprobs([ids], top_k=3)
    assert len(s.logprobs) == len(ids) - 1 and all(len(t) == 3 for t in s.top_ids)
    for lp, top_lp, top_id, tok, greedy in zip(s.logprobs, s.top_logprobs, s.top_ids, ids[1:], s.greedy,
                                               strict=True):
        assert top_lp == sorted(top_lp, reverse=True) and lp <= top_lp[0] + 1e-6
        assert greedy == (top_id[0] == tok)


def test_requests_the_model_cannot_serve_raise_backend_error(backend):
    with pytest.raises(BackendError, match="window is 256"):
        backend.generate(["x" * 250], max_tokens=10)
    with pytest.raises(BackendError, match="non-empty continuation"):
        backend.loglikelihood("Hello", "")
    long = backend.loglikelihood("y" * 400, "abc")  # the context is left-truncated to the window, as lm-eval does
    assert long.num_tokens == 3


def test_chat_prompt_uses_the_template_when_there_is_one(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat_prompt(tiny.tokenizer, messages) == plain_chat_prompt(messages) == \
        "system: Be brief.\nuser: hi\nassistant:"
    templated = copy.deepcopy(tiny.tokenizer)
    templated.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_prompt(templated, messages) == "<system>Be brief.<user>hi<assistant>"


def test_get_backend_parses_specs():
    remote = get_backend("http://127.0.0.1:9/v1/#smollm2-135m")
    assert isinstance(remote, OpenAIBackend) and isinstance(remote, Backend)
    assert (remote.base_url, remote.model) == ("http://127.0.0.1:9/v1", "smollm2-135m")
    assert get_backend("https://example.invalid/v1").model == "default"
    local = get_backend("tiny:micro", batch_size=2)
    assert isinstance(local, LocalHFBackend) and isinstance(local, Backend) and local.batch_size == 2


@pytest.fixture
def canned_server():
    """A loopback HTTP server that answers every POST with the JSON body in ``state["body"]``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"body": "{}"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = state["body"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/v1"
    yield state
    server.shutdown()
    server.server_close()


GEN = lambda b: b.generate(["hi"])  # noqa: E731
CHAT = lambda b: b.chat([{"role": "user", "content": "hi"}])  # noqa: E731
LL = lambda b: b.loglikelihood("a", "b")  # noqa: E731


def _echo(tokens, logprobs, offsets, top):
    return json.dumps({"choices": [{"index": 0, "logprobs": {"tokens": tokens, "token_logprobs": logprobs,
                                                             "text_offset": offsets, "top_logprobs": top}}]})


@pytest.mark.parametrize("call, body", [
    (GEN, '{"choices": null}'),
    (GEN, '{"choices": ["x"]}'),
    (GEN, '{"choices": [{"text": 5}]}'),
    (GEN, '{"choices": [{"text": "a"}], "usage": {"prompt_tokens": "x"}}'),
    (CHAT, '{"choices": [{"message": {"content": "a"}}], "usage": [1]}'),
    (LL, '{"choices": null}'),
    (LL, _echo(["a", "b"], [None, -1.0], [0, None], [None, {"b": -1.0}])),
    (LL, _echo(["a", "b"], [None, "x"], [0, 1], [None, {"b": -1.0}])),
    (LL, _echo(["a", "b"], [None, -1.0], [0, 1], [None, [1]])),
    (LL, _echo(["a", "b"], [None, -1.0], [0], [None, {"b": -1.0}])),
])
def test_malformed_openai_answers_raise_one_backend_error(canned_server, call, body):
    # these used to escape as TypeError / AttributeError (or a Completion whose text is an int)
    canned_server["body"] = body
    with OpenAIBackend(canned_server["url"]) as b, pytest.raises(BackendError, match=r"127\.0\.0\.1.*/v1/") as e:
        call(b)
    assert "\n" not in str(e.value)


def test_well_formed_canned_answers_still_parse(canned_server):
    canned_server["body"] = _echo(["a", "b"], [None, -1.5], [0, 1], [None, {"b": -1.5, "c": -2.0}])
    with OpenAIBackend(canned_server["url"]) as b:
        assert LL(b) == LogLikelihood(logprob=-1.5, is_greedy=True, num_tokens=1)
        canned_server["body"] = '{"choices": [{"text": null, "finish_reason": "length"}], "usage": []}'
        assert GEN(b) == [[Completion("", 0, 0, "length")]]


def test_local_backend_ignores_dropout_of_a_model_left_in_train_mode():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.lm import tokenizer as tok_mod

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=258, n_positions=64,
                                       bos_token_id=256, eos_token_id=256)).eval()  # dropout 0.1
    b = LocalHFBackend(model, tok_mod.byte_tokenizer())
    ref_ll, ref_gen = b.loglikelihood("The cat", " sat on the mat"), b.generate(["Hello"], max_tokens=8)
    model.train()
    for _ in range(2):
        assert b.loglikelihood("The cat", " sat on the mat") == ref_ll
        assert b.generate(["Hello"], max_tokens=8) == ref_gen
    assert model.training
