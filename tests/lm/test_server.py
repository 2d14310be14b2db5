"""The OpenAI-compatible server on a real loopback port, talked to by OpenAIBackend and raw httpx; the CLI."""

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmlab.errors import BackendError
from lmlab.lm.backends import LocalHFBackend, OpenAIBackend
from lmlab.lm.server import create_app, serve_in_thread

torch.set_num_threads(1)

PROMPTS = ["Hello", "xyz", "The cat sat on the", "a"]
PAIRS = [("Hello", " world"), ("Hello", "ooooo"), ("a", "b"), ("The cat sat on the ", "mat."),
         ("héllo", " wörld"), ("Q: 1+1=\nA:", " 2")]


@pytest.fixture(scope="module")
def local(tiny):
    return LocalHFBackend(tiny.model, tiny.tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def base_url(local):
    with serve_in_thread(create_app(local, "tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def remote(base_url):
    with OpenAIBackend(base_url, "tiny", timeout=30.0) as backend:
        yield backend


def test_models_lists_the_served_name(base_url):
    body = httpx.get(f"{base_url}/models").json()
    assert [m["id"] for m in body["data"]] == ["tiny"]


def test_generate_over_http_equals_local(remote, local):
    for kw in (dict(max_tokens=8), dict(max_tokens=8, stop=["o", "zz"]), dict(max_tokens=6, n=2)):
        assert remote.generate(PROMPTS, **kw) == [local.generate([p], **kw)[0] for p in PROMPTS]
    sampled = dict(n=3, max_tokens=6, temperature=1.0, seed=7)
    assert remote.generate(["The"], **sampled) == local.generate(["The"], **sampled)


def test_completion_response_shape_and_usage(base_url):
    body = httpx.post(f"{base_url}/completions", json=dict(prompt=["Hello", "abc"], n=2, max_tokens=3,
                                                           temperature=0)).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["ooo", "ooo", "ccc", "ccc"]
    assert body["usage"] == dict(prompt_tokens=5 + 3, completion_tokens=4 * 3, total_tokens=20)


def test_echo_logprobs_describe_the_prompt_tokens(base_url, local):
    body = httpx.post(f"{base_url}/completions", json=dict(prompt="Hello", max_tokens=2, temperature=0, echo=True,
                                                           logprobs=2)).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "Hellooo"
    assert lp["tokens"] == list("Hellooo") and lp["text_offset"] == list(range(7))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(top) <= 2 and max(top.values()) >= lp_ - 1e-6
               for top, lp_ in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True))
    ids = local.tokenizer("Hellooo", add_special_tokens=False)["input_ids"]
    expected = local.token_logprobs([ids])[0].logprobs
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    # without echo, only the completion's tokens, with offsets after the prompt
    body = httpx.post(f"{base_url}/completions", json=dict(prompt="Hello", max_tokens=2, temperature=0,
                                                           logprobs=0)).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["o", "o"] and lp["text_offset"] == [5, 6]
    assert lp["token_logprobs"] == pytest.approx(expected[-2:], abs=1e-4)
    # a one-token prompt echoed with max_tokens=0: nothing to score
    body = httpx.post(f"{base_url}/completions", json=dict(prompt="H", max_tokens=0, echo=True, logprobs=1)).json()
    assert body["choices"][0]["logprobs"]["tokens"] == ["H"] and body["choices"][0]["text"] == "H"
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None] and body["usage"]["completion_tokens"] == 0


def test_loglikelihood_over_http_equals_local(remote, local):
    here, there = local.loglikelihood_batch(PAIRS), remote.loglikelihood_batch(PAIRS)
    for a, b in zip(here, there, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert (b.is_greedy, b.num_tokens) == (a.is_greedy, a.num_tokens)
    assert [a.is_greedy for a in here[:2]] == [False, True]  # "ooooo" is the model's greedy continuation of "Hello"


def test_chat_returns_an_assistant_message(base_url, remote, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    reply = remote.chat(messages, max_tokens=5)
    assert reply == local.chat(messages, max_tokens=5)
    assert reply.prompt_tokens == len("system: Be brief.\nuser: hi\nassistant:")
    body = httpx.post(f"{base_url}/chat/completions", json=dict(messages=messages, max_tokens=4)).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


@pytest.mark.parametrize("path, body, status, words", [
    ("/completions", dict(prompt="x", temperature=5), 422, "temperature"),
    ("/completions", dict(prompt="x", n=0), 422, "n:"),
    ("/completions", dict(max_tokens=3), 422, "prompt: Field required"),
    ("/completions", dict(prompt="x", max_tokens=0), 422, "echo"),
    ("/completions", dict(prompt="x", logprobs=9), 422, "logprobs"),
    ("/completions", dict(prompt="x", model="gpt-4"), 404, "'gpt-4' is not served"),
    ("/completions", dict(prompt="x" * 300), 400, "window is 256"),
    ("/chat/completions", dict(messages=[]), 422, "messages"),
    ("/completions", dict(prompt="x", seed=2**70), 422, "seed: Input should be less than or equal to"),
    ("/completions", dict(prompt="x", seed=-(2**64)), 422, "seed: Input should be greater than or equal to"),
    ("/chat/completions", dict(messages=[{"role": "user", "content": "x"}], seed=2**64), 422, "seed"),
    ("/chat/completions", dict(messages=[{"role": "user", "content": "x"}], model="other"), 404, "not served"),
])
def test_invalid_requests_get_4xx_with_a_message(base_url, path, body, status, words):
    response = httpx.post(f"{base_url}{path}", json=body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


@pytest.mark.parametrize("path, raw, field", [
    ("/completions", r'{"prompt": "a \ud800 b", "max_tokens": 2}', "prompt"),
    ("/completions", r'{"prompt": ["ok", "a \udfff"], "max_tokens": 2}', "prompt"),
    ("/completions", r'{"prompt": "ok", "stop": "\ud800"}', "stop"),
    ("/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800"}]}', "messages.0.content"),
])
def test_lone_surrogates_are_invalid_requests_not_server_errors(base_url, path, raw, field):
    # JSON's "\ud800" escape decodes to a string the tokenizer cannot encode: this was a 500
    response = httpx.post(f"{base_url}{path}", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert field in message and "lone surrogate" in message


def test_the_largest_seeds_are_served(base_url):
    for seed in (2**63 - 1, -(2**63)):
        body = dict(prompt="The", max_tokens=2, seed=seed)
        assert httpx.post(f"{base_url}/completions", json=body).status_code == 200


def test_openai_backend_raises_backend_error_with_the_server_message(base_url, remote):
    with pytest.raises(BackendError, match=r"HTTP 422: temperature: Input should be less than or equal to 2"):
        remote.generate(["x"], temperature=5)
    with pytest.raises(BackendError, match=r"HTTP 404: model 'nope' is not served here"):
        OpenAIBackend(base_url, "nope").generate(["x"])
    with pytest.raises(BackendError, match="non-empty context"):
        remote.loglikelihood("", "abc")


def test_connection_refused_raises_backend_error():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError, match=f"cannot reach http://127.0.0.1:{port}/v1/completions.*refused"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", timeout=5.0).generate(["x"])


def test_concurrent_requests_all_succeed_and_match_serial(remote):
    prompts = [f"{i} {PROMPTS[i % 4]}" for i in range(20)]
    serial = [remote.generate([p], max_tokens=6)[0] for p in prompts]
    with ThreadPoolExecutor(max_workers=20) as pool:
        concurrent = list(pool.map(lambda p: remote.generate([p], max_tokens=6)[0], prompts))
    assert concurrent == serial


def test_serve_lm_unknown_model_is_one_line_and_exit_2(capsys):
    from lmlab.cli import main

    assert main(["serve-lm", "nosuchmodel"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'nosuchmodel'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["--name", ""], "--name must not be empty"),  # served a model named ""
    (["--host", "999.1.1.1"], "cannot listen on 999.1.1.1:"),  # rc 3 after 7 lines of uvicorn's log
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: Address already in use"),
])
def test_serve_lm_refuses_a_bad_name_or_address_in_one_line_before_loading(capsys, monkeypatch, argv, words):
    from lmlab.cli import main
    from lmlab.lm import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded the model first"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve-lm", "tiny:micro", *(a.format(busy=port) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words.format(busy=port) in err and "serving" not in err, err


@pytest.mark.slow
def test_smollm2_over_http_equals_local_with_a_bpe_tokenizer_and_chat_template(smollm2):
    local = LocalHFBackend(smollm2.model, smollm2.tokenizer, batch_size=4)
    pairs = [("The capital of France is", " Paris"), ("The capital of France is ", "Paris"), ("2+2=", "4"),
             ("Hello, my name", " is John."), ("naïve café", " olé")]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with serve_in_thread(create_app(local, "smollm2")) as url, OpenAIBackend(url, "smollm2") as remote:
        here, there = local.loglikelihood_batch(pairs), remote.loglikelihood_batch(pairs)
        for a, b in zip(here, there, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert (b.is_greedy, b.num_tokens) == (a.is_greedy, a.num_tokens)
        assert here[0] == here[1] and here[0].is_greedy and here[0].logprob > -1  # " Paris": one greedy token
        kw = dict(max_tokens=10, stop=["."])
        assert remote.generate(["The capital of France is"], **kw) == local.generate(["The capital of France is"], **kw)
        reply = remote.chat(messages, max_tokens=20)
        assert reply == local.chat(messages, max_tokens=20) and "Paris" in reply.text


def test_a_temperature_too_small_to_sample_with_is_greedy_not_a_500(base_url, local):
    # logits / 1e-45 overflow to inf and sampling raised "probability tensor contains inf": a 500 (vLLM treats
    # temperatures below 1e-5 as greedy; so do we)
    greedy = local.generate(["The"], max_tokens=4)
    for temperature in (1e-45, 1e-6):
        body = dict(prompt="The", max_tokens=4, temperature=temperature, n=2)
        response = httpx.post(f"{base_url}/completions", json=body)
        assert response.status_code == 200
        assert [c["text"] for c in response.json()["choices"]] == [greedy[0][0].text] * 2
        assert local.generate(["The"], max_tokens=4, temperature=temperature) == greedy


def test_messages_the_chat_template_refuses_are_a_400_and_the_server_goes_on(tiny):
    # a template that raises (Llama-2 and Gemma templates refuse a system role or roles that do not alternate)
    # made a 500 with a jinja2 traceback
    import copy

    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    with serve_in_thread(create_app(LocalHFBackend(tiny.model, tok), "tiny")) as url:
        refused = httpx.post(f"{url}/chat/completions", json=dict(messages=[{"role": "system", "content": "x"}]))
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == \
            "the tokenizer's chat template refuses these messages: System role not supported"
        ok = httpx.post(f"{url}/chat/completions", json=dict(messages=[{"role": "user", "content": "x"}],
                                                             max_tokens=2))
        assert ok.status_code == 200
