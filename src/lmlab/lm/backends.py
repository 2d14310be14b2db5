"""The text-generation protocol: one interface for a local Hugging Face model and any OpenAI-compatible server.

Agents (Graph of Thoughts, tool use) and evaluations talk to a language model only through
:class:`Backend`, so a user can point them at a local model or at an HTTP endpoint (vLLM, llama.cpp,
``lmlab serve-lm``, OpenAI itself) without changing code. A backend does four things:

- ``generate(prompts, n=, max_tokens=, temperature=, stop=, seed=)``: for each prompt, ``n``
  :class:`Completion` s (text, token counts for cost accounting, ``finish_reason`` "stop" or "length").
  ``temperature == 0`` (or below 1e-5) is greedy; stop strings truncate the text at the first occurrence.
- ``chat(messages, ...)``: one assistant reply to a list of ``{"role", "content"}`` messages.
- ``loglikelihood(context, continuation)``: a :class:`LogLikelihood` (sum of the continuation's token
  log-probabilities given the context, whether greedy decoding would produce it, how many tokens).
- ``loglikelihood_batch(pairs)``: the same for many pairs, batched.

Implementations:

- :class:`LocalHFBackend` runs any ``AutoModelForCausalLM`` in-process: batched ``model.generate``
  with left padding, and one right-padded forward pass per batch for log-likelihoods.
- :class:`OpenAIBackend` calls ``/completions`` and ``/chat/completions`` over HTTP with ``httpx``.
  Log-likelihoods use the lm-evaluation-harness trick for API models: ask for the prompt's own
  log-probabilities (``echo=True, logprobs=1, max_tokens=0``) and sum those of the tokens whose
  ``text_offset`` falls inside the continuation.
- :func:`get_backend` picks one from a spec string (``http://host:port/v1#model`` or a model spec).

Tokenisation follows lm-evaluation-harness v0.4 (``HFLM._encode_pair``): texts are encoded without
special tokens; trailing whitespace of the context moves to the start of the continuation (BPE
vocabularies attach a space to the following word); the continuation's tokens are those of
``encode(context + continuation)`` after the first ``len(encode(context))``; an empty context is
replaced by the BOS token (or EOS where there is no BOS). Deviation: lm-eval's old (v0.3) rule
encoded the continuation on its own; the joint encoding is what an HTTP server scores, so local and
remote results agree.

Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from lmlab.errors import BackendError, ConfigError, first_line

FinishReason = Literal["stop", "length"]
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

# OpenAI semantics: the request alone decides decoding. Without these, transformers fills whatever a
# request leaves unset from the checkpoint's generation_config.json (a repetition penalty, top-k 50, top-p).
NEUTRAL_DECODING = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)
NEUTRAL_SAMPLING = dict(top_k=0, top_p=1.0, typical_p=1.0, min_p=0.0)  # pure temperature sampling
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits divided by a tiny one overflow to inf.
# The local backend, serve-lm and the kNN-LM sampler share it.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Completion:
    """One generated text and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens that produced `text` (after stop truncation), not tokens generated
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_tokens reached
    # ids of the kept completion tokens where the backend knows them (local models); empty over HTTP
    token_ids: tuple[int, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class LogLikelihood:
    """log p(continuation | context) under the model."""

    logprob: float  # sum over the continuation's tokens
    is_greedy: bool  # argmax at every continuation position equals the continuation's token
    num_tokens: int  # continuation tokens scored


@dataclass(frozen=True)
class TokenLogprobs:
    """Per-token scores of one sequence of T tokens: entry t-1 scores token t given tokens < t."""

    token_ids: list[int]  # the T tokens scored
    logprobs: list[float]  # T-1 values: log p(token t | tokens < t) for t = 1..T-1
    greedy: list[bool]  # T-1 values: token t is the argmax at its position
    top_ids: list[list[int]]  # T-1 lists of the top_k most likely ids (empty when top_k == 0)
    top_logprobs: list[list[float]]  # their log-probabilities


@runtime_checkable
class Backend(Protocol):
    """What agents and evaluations need from a language model (see the module docstring)."""

    def generate(self, prompts: list[str], *, n: int = 1, max_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, seed: int | None = None) -> list[list[Completion]]:
        """For each prompt, ``n`` completions (greedy when temperature is 0)."""
        ...

    def chat(self, messages: list[Message], *, max_tokens: int = 64, temperature: float = 0.0,
             stop: list[str] | None = None, seed: int | None = None) -> Completion:
        """The assistant's reply to a conversation."""
        ...

    def loglikelihood(self, context: str, continuation: str) -> LogLikelihood:
        """log p(continuation | context)."""
        ...

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        """:meth:`loglikelihood` of many (context, continuation) pairs, in order."""
        ...


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation (lm-eval ``_encode_pair``)."""
    if not continuation:
        raise BackendError("loglikelihood needs a non-empty continuation")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def plain_chat_prompt(messages: list[Message]) -> str:
    """The fallback chat format for tokenizers without a chat template: "role: content" lines, then "assistant:"."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt(tokenizer, messages: list[Message]) -> str:
    """A conversation as prompt text: the tokenizer's chat template if it has one, else :func:`plain_chat_prompt`."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # templates raise on what they do not support (a system role, roles out of turn)
            raise BackendError(f"the tokenizer's chat template refuses these messages: {first_line(e, 200)}") from e
    return plain_chat_prompt(messages)


def _apply_stop(text: str, stop: list[str] | None) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return min(hits) if hits else None


class LocalHFBackend:
    """A Hugging Face causal LM in this process (any ``AutoModelForCausalLM`` and its tokenizer).

    Not thread-safe: callers that share one instance across threads serialise access (the server does).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(set(eos))
        self.max_length: int | None = getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def from_spec(cls, spec: str, *, batch_size: int = 8, **load_kwargs) -> LocalHFBackend:
        """Load a model with :func:`lmlab.lm.models.load` (``load_kwargs`` go there) and wrap it."""
        from lmlab.lm import models

        loaded = models.load(spec, **load_kwargs)
        return cls(loaded.model, loaded.tokenizer, batch_size=batch_size)

    # -- tokenisation -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens; an empty text is the BOS (or EOS) token alone."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return ids or [self.prefix_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(context + continuation ids, number of continuation tokens), left-truncated to the model's window."""
        context, continuation = move_trailing_whitespace(context, continuation)
        if not context:
            ctx, cont = [self.prefix_token_id], self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        else:
            ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
        ids = ctx + cont
        if self.max_length is not None and len(ids) > self.max_length + 1:
            if len(cont) > self.max_length:
                raise BackendError(f"the continuation has {len(cont)} tokens; the model's window is "
                                   f"{self.max_length}")
            ids = ids[-(self.max_length + 1):]  # keep the end of the context, as lm-eval does
        return ids, len(cont)

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: list[str], *, n: int = 1, max_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, seed: int | None = None) -> list[list[Completion]]:
        """For each prompt, ``n`` completions; batched ``model.generate`` with left padding.

        Greedy when ``temperature`` is 0 (or below :data:`GREEDY_BELOW`; the ``n`` completions are then identical
        and computed once),
        otherwise pure temperature sampling (no top-k/top-p), reproducible for a given ``seed`` and
        ``batch_size``. Generation runs to EOS or ``max_tokens``; stop strings then truncate the text.
        """
        import torch

        if n < 1 or max_tokens < 0 or temperature < 0:
            raise BackendError(f"need n >= 1, max_tokens >= 0 and temperature >= 0 (got {n}, {max_tokens}, "
                               f"{temperature})")
        encoded = [self.encode(p) for p in prompts]
        too_long = [len(ids) + max_tokens for ids in encoded if self.max_length and
                    len(ids) + max_tokens > self.max_length]
        if too_long:
            raise BackendError(f"the model's window is {self.max_length} tokens; a prompt plus max_tokens needs "
                               f"{max(too_long)}: shorten the prompt or lower max_tokens")
        if max_tokens == 0:
            return [[Completion("", len(ids), 0, "length")] * n for ids in encoded]
        sample = temperature >= GREEDY_BELOW
        rows = [i for i in range(len(prompts)) for _ in range(n if sample else 1)]  # prompt index per row
        results: list[list[Completion]] = [[] for _ in prompts]
        with torch.random.fork_rng(devices=self._cuda_devices(), enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                new_tokens = self._generate_batch([encoded[i] for i in chunk], max_tokens,
                                                  temperature if sample else 0.0)
                for i, ids in zip(chunk, new_tokens, strict=True):
                    results[i].append(self._completion(ids, len(encoded[i]), stop))
        return results if sample else [r * n for r in results]

    def _cuda_devices(self) -> list[int]:
        device = next(self.model.parameters()).device
        return [device.index or 0] if device.type == "cuda" else []

    def _generate_batch(self, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[list[int]]:
        """New token ids (B rows, each up to max_tokens, padding included) for left-padded prompts."""
        import torch
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = dict(do_sample=True, temperature=temperature, **NEUTRAL_SAMPLING) if temperature > 0 else \
            dict(do_sample=False)
        config = GenerationConfig(max_new_tokens=max_tokens, eos_token_id=self.eos_token_ids,
                                  pad_token_id=self.pad_token_id, **NEUTRAL_DECODING, **sampling)
        from lmlab.lm.score import eval_mode

        with torch.inference_mode(), eval_mode(self.model):  # no dropout, also for a model left in train()
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return out[:, width:].tolist()

    def _completion(self, ids: list[int], prompt_tokens: int, stop: list[str] | None) -> Completion:
        """Cut generated ids at the first EOS, decode, truncate at the first stop string."""
        eos = next((j for j, t in enumerate(ids) if t in self.eos_token_ids), None)
        finish: FinishReason = "length"
        if eos is not None:
            ids, finish = ids[:eos], "stop"
        text = self.decode(ids)
        cut = _apply_stop(text, stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            # the fewest tokens whose decoding covers the kept text (a token straddling the cut counts)
            kept = bisect.bisect_left(range(len(ids) + 1), cut, key=lambda k: len(self.decode(ids[:k])))
            ids = ids[:kept]
        return Completion(text, prompt_tokens, len(ids), finish, tuple(ids))

    def chat(self, messages: list[Message], *, max_tokens: int = 64, temperature: float = 0.0,
             stop: list[str] | None = None, seed: int | None = None) -> Completion:
        """The reply to ``messages`` formatted with :func:`chat_prompt`."""
        prompt = chat_prompt(self.tokenizer, messages)
        return self.generate([prompt], max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed)[0][0]

    # -- scoring ------------------------------------------------------------------------------------

    def token_logprobs(self, sequences: list[list[int]], *, top_k: int = 0) -> list[TokenLogprobs]:
        """Score every token of each sequence given the ones before it, ``batch_size`` sequences per forward pass.

        Sequences are sorted by length and right-padded (with an attention mask), so padding never
        changes a score; results come back in the input order.
        """
        import torch

        from lmlab.lm.score import eval_mode

        if any(not s for s in sequences):
            raise BackendError("cannot score an empty token sequence")
        if self.max_length is not None and any(len(s) > self.max_length + 1 for s in sequences):
            longest = max(map(len, sequences))
            raise BackendError(f"a sequence has {longest} tokens; the model's window is {self.max_length}")
        device = next(self.model.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[TokenLogprobs | None] = [None] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs = [sequences[i] for i in chunk]
            width = max(map(len, seqs))
            if width == 1:  # single tokens: nothing to score
                for i in chunk:
                    out[i] = TokenLogprobs(sequences[i], [], [], [], [])
                continue
            ids = torch.tensor([s + [self.pad_token_id] * (width - len(s)) for s in seqs], device=device)  # B x T
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            with torch.inference_mode(), eval_mode(self.model):  # the last token predicts nothing we score: feed
                # T-1 tokens, as lm-eval does
                logits = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits  # B x T-1 x V
            logp = logits.float().log_softmax(-1)  # position t-1 predicts token t
            targets = ids[:, 1:]
            token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # B x T-1
            greedy = logp.argmax(-1) == targets
            top_lp, top_ids = logp.topk(top_k, dim=-1)  # B x T-1 x top_k (top_k may be 0)
            for row, i in enumerate(chunk):
                m = len(sequences[i]) - 1
                out[i] = TokenLogprobs(sequences[i], token_lp[row, :m].tolist(), greedy[row, :m].tolist(),
                                       top_ids[row, :m].tolist(), top_lp[row, :m].tolist())
        return out  # type: ignore[return-value]

    def loglikelihood(self, context: str, continuation: str) -> LogLikelihood:
        """log p(continuation | context), tokenised as lm-evaluation-harness does (module docstring)."""
        return self.loglikelihood_batch([(context, continuation)])[0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        """:meth:`loglikelihood` of each pair; batched with right padding, equal to the unbatched results."""
        encoded = [self._encode_pair(c, x) for c, x in pairs]
        scores = self.token_logprobs([ids for ids, _ in encoded])
        return [LogLikelihood(logprob=float(sum(s.logprobs[len(s.logprobs) - k:])) if k else 0.0,
                              is_greedy=all(s.greedy[len(s.greedy) - k:]) if k else True, num_tokens=k)
                for s, (_, k) in zip(scores, encoded, strict=True)]


class OpenAIBackend:
    """An OpenAI-compatible HTTP endpoint (``lmlab serve-lm``, vLLM, llama.cpp server, OpenAI).

    ``base_url`` ends with the API version, e.g. ``http://127.0.0.1:8000/v1``. ``api_key`` defaults
    to ``$OPENAI_API_KEY`` (sent as a Bearer token when set). Every failure (no server, an HTTP error
    status, a malformed answer) raises :class:`~lmlab.errors.BackendError` with one line that names
    the URL, the status and the server's message.
    """

    scoring_batch = 16  # prompts per echo request in loglikelihood_batch

    def __init__(self, base_url: str, model: str = "default", *, api_key: str | None = None, timeout: float = 60.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model = model
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, payload: dict) -> dict:
        """POST JSON and return the decoded answer, turning every failure into a one-line BackendError."""
        import httpx

        url = f"{self.base_url}{path}"
        body = {"model": self.model, **{k: v for k, v in payload.items() if v is not None}}
        try:
            response = self._client.post(path, json=body)
        except httpx.TimeoutException as e:
            raise BackendError(f"{url} did not answer within {self._client.timeout.read}s "
                               f"(raise the backend's timeout for long generations)") from e
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach {url}: {str(e) or type(e).__name__} (is the server running? "
                               f"`lmlab serve-lm MODEL` starts one)") from e
        if response.status_code >= 400:
            raise BackendError(f"{url} answered HTTP {response.status_code}: {_error_message(response)}")
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BackendError(f"{url} answered HTTP {response.status_code} with no JSON object: "
                               f"{response.text[:200]!r}")
        return data

    def generate(self, prompts: list[str], *, n: int = 1, max_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, seed: int | None = None) -> list[list[Completion]]:
        """POST ``/completions`` once per prompt (so token counts are exact per prompt).

        OpenAI reports usage per request, not per choice: with ``n > 1`` the request's completion
        tokens are shared evenly among its choices (their sum is exact).
        """
        results = []
        for prompt in prompts:
            data = self._post("/completions", dict(prompt=prompt, n=n, max_tokens=max_tokens,
                                                   temperature=temperature, stop=stop or None, seed=seed))
            url = f"{self.base_url}/completions"
            choices = _choices(data, url)
            if len(choices) != n:
                raise BackendError(f"{url} returned {len(choices)} choices, expected {n}")
            prompt_tokens, completion_tokens = _usage(data, url)
            shares = _shares(completion_tokens, n)
            results.append([Completion(_text(c.get("text"), url), prompt_tokens, share,
                                       _finish(c.get("finish_reason")))
                            for c, share in zip(choices, shares, strict=True)])
        return results

    def chat(self, messages: list[Message], *, max_tokens: int = 64, temperature: float = 0.0,
             stop: list[str] | None = None, seed: int | None = None) -> Completion:
        """POST ``/chat/completions`` and return the first choice's message."""
        data = self._post("/chat/completions", dict(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                                    stop=stop or None, seed=seed))
        url = f"{self.base_url}/chat/completions"
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(f"{url} returned no message: {str(data)[:200]}") from e
        prompt_tokens, completion_tokens = _usage(data, url)
        return Completion(_text(text, url), prompt_tokens, completion_tokens, _finish(choice.get("finish_reason")))

    def loglikelihood(self, context: str, continuation: str) -> LogLikelihood:
        """log p(continuation | context) from the echoed prompt log-probabilities (module docstring)."""
        return self.loglikelihood_batch([(context, continuation)])[0]

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        """:meth:`loglikelihood` of each pair, ``scoring_batch`` prompts per request."""
        split = [move_trailing_whitespace(c, x) for c, x in pairs]
        if any(not c for c, _ in split):
            raise BackendError("loglikelihood over HTTP needs a non-empty context: the endpoint gives no "
                               "log-probability for a prompt's first token")
        results = []
        for start in range(0, len(split), self.scoring_batch):
            chunk = split[start:start + self.scoring_batch]
            data = self._post("/completions", dict(prompt=[c + x for c, x in chunk], max_tokens=0, echo=True,
                                                   logprobs=1, temperature=0.0))
            choices = _choices(data, f"{self.base_url}/completions")
            if len(choices) != len(chunk):
                raise BackendError(f"{self.base_url}/completions returned {len(choices)} choices for "
                                   f"{len(chunk)} prompts")
            results += [self._score_echo(choice, len(context))
                        for choice, (context, _) in zip(choices, chunk, strict=True)]
        return results

    def _score_echo(self, choice: dict, context_chars: int) -> LogLikelihood:
        """Sum the echoed log-probabilities of the tokens that start at or after the end of the context."""
        url = f"{self.base_url}/completions"
        try:
            lp = choice["logprobs"]
            rows = list(zip(lp["tokens"], lp["token_logprobs"], lp["text_offset"], lp["top_logprobs"], strict=True))
        except (KeyError, TypeError, ValueError) as e:  # ValueError: lists of different lengths
            raise BackendError(f"{url} returned no echoed logprobs (does the server support echo=True with "
                               f"logprobs?)") from e
        total, greedy, count = 0.0, True, 0
        for token, logprob, offset, top in rows:
            if not _is_number(offset):
                raise BackendError(f"{url} returned a text_offset that is not a number: {offset!r}")
            if offset < context_chars:
                continue
            if logprob is None:
                raise BackendError(f"{url} returned a null logprob inside the continuation")
            if not _is_number(logprob):
                raise BackendError(f"{url} returned a logprob that is not a number: {logprob!r}")
            if top is not None and not isinstance(top, dict):
                raise BackendError(f"{url} returned top_logprobs that are not a token -> logprob object: {top!r}"[:300])
            total += logprob
            greedy = greedy and bool(top) and max(top, key=top.get) == token
            count += 1
        return LogLikelihood(logprob=total, is_greedy=greedy, num_tokens=count)


def _error_message(response) -> str:
    """The server's own message from an error response (OpenAI, FastAPI or plain text), on one line."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300] or response.reason_phrase
    if isinstance(body, dict):
        error, detail = body.get("error"), body.get("detail")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
        if isinstance(detail, list):  # FastAPI's default validation error
            return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
        if detail:
            return str(detail)
    return " ".join(str(body).split())[:300]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _choices(data: dict, url: str) -> list[dict]:
    """The answer's ``choices`` sorted by ``index``; BackendError unless it is a list of objects."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices) or \
            not all(_is_number(c.get("index", 0)) for c in choices):
        raise BackendError(f"{url} returned no list of choices: {str(data)[:200]}")
    return sorted(choices, key=lambda c: c.get("index", 0))


def _usage(data: dict, url: str) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of the answer's ``usage`` (0 where absent); BackendError when malformed."""
    usage = data.get("usage") or {}
    counts = (usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0) if isinstance(usage, dict) \
        else None
    if counts is None or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in counts):
        raise BackendError(f"{url} returned a malformed usage object: {str(data.get('usage'))[:200]}")
    return counts


def _text(value, url: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BackendError(f"{url} returned a completion text that is not a string: {str(value)[:200]}")
    return value


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _shares(total: int, n: int) -> list[int]:
    """Split ``total`` into ``n`` integers that differ by at most one and sum to ``total``."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def get_backend(spec: str, **kwargs) -> Backend:
    """A backend from one string.

    ``http://host:port/v1#model`` (or https) gives an :class:`OpenAIBackend` for that model (the
    name after ``#``, default "default"); anything else is a model spec for
    :meth:`LocalHFBackend.from_spec`. ``kwargs`` go to the constructor.
    """
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return OpenAIBackend(url, model or "default", **kwargs)
    return LocalHFBackend.from_spec(spec, **kwargs)
