"""An OpenAI-compatible HTTP server for a local model: ``lmlab serve-lm MODEL``.

Serves a :class:`~lmlab.lm.backends.LocalHFBackend` with the subset of the OpenAI API that agents
and evaluations use, so that :class:`~lmlab.lm.backends.OpenAIBackend` (or any OpenAI client) can
talk to it:

- ``GET /v1/models``: the one served model.
- ``POST /v1/completions`` (the legacy completions API): ``prompt`` (a string or a list), ``max_tokens``
  (default 16; 0 only with ``echo``), ``temperature`` (0-2; below 1e-5 is greedy), ``n`` (1-16), ``stop``, ``seed``
  (an int64), ``echo``, ``logprobs`` (0-5 alternatives per token). With ``echo`` and ``logprobs`` the
  prompt's own token log-probabilities come back (the first token's is null), with the token strings and
  their ``text_offset`` in the prompt, which is what log-likelihood scoring over HTTP needs.
- ``POST /v1/chat/completions``: ``messages`` ({role, content}) formatted with the tokenizer's chat
  template, or "role: content" lines ending in "assistant:" where it has none.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: an invalid request
is 422 (the message names the field; a string holding a lone surrogate escape is invalid), an unknown
model is 404, a request the model cannot serve (e.g. longer than its window) is 400. Requests run in
FastAPI's threadpool and take one lock around the model, so the event loop keeps answering while a request
generates.

:func:`serve_in_thread` runs an app on a free loopback port in a background thread (for tests).
"""

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

import click
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lmlab.lm.backends import Completion, LocalHFBackend, chat_prompt

if TYPE_CHECKING:
    from fastapi import FastAPI


# -- request bodies (field limits follow OpenAI's API reference) ------------------------------------


def _unicode(value: str) -> str:
    """JSON's lone ``\\ud800`` escapes decode to strings no tokenizer can encode: a 422, not a 500."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
INT64 = 2**63  # OpenAI's seed is an int64; torch.manual_seed overflows beyond 64 bits


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # accept (and ignore) OpenAI fields we do not implement

    model: Text | None = None  # the served name; may be omitted
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    n: int = Field(1, ge=1, le=16)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class CompletionRequest(_Request):
    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _max_tokens_zero_needs_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 is allowed only with echo=true)")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    @model_validator(mode="after")
    def _positive_max_tokens(self) -> "ChatRequest":
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        return self


# -- the app ----------------------------------------------------------------------------------------


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


class _ModelNotFound(Exception):
    def __init__(self, requested: str, served: str):
        super().__init__(f"model {requested!r} is not served here; this server serves {served!r}")


def create_app(backend: LocalHFBackend, model_name: str) -> "FastAPI":
    """The FastAPI app serving ``backend`` under the name ``model_name`` (module docstring)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from lmlab.errors import LmlabError

    app = FastAPI(title="lmlab serve-lm", summary=f"OpenAI-compatible API for {model_name}")
    lock = threading.Lock()  # one request at a time touches the model
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors]
        param = ".".join(str(x) for x in errors[0]["loc"][1:]) if errors else None
        return _error(422, "; ".join(parts), param=param or None)

    @app.exception_handler(_ModelNotFound)
    async def _not_found(request, exc: _ModelNotFound):
        return _error(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(LmlabError)
    async def _unservable(request, exc: LmlabError):
        return _error(400, str(exc))

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise _ModelNotFound(requested, model_name)

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmlab"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict:  # sync: FastAPI runs it in its threadpool
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        with lock:
            results = backend.generate(prompts, n=req.n, max_tokens=req.max_tokens, temperature=req.temperature,
                                       stop=req.stop_list(), seed=req.seed)
            flat = [(prompt, c) for prompt, row in zip(prompts, results, strict=True) for c in row]  # index order
            logprobs = _logprobs(backend, flat, echo=req.echo, top_k=req.logprobs) if req.logprobs is not None \
                else [None] * len(flat)
        choices = [dict(index=k, text=(prompt if req.echo else "") + c.text, finish_reason=c.finish_reason,
                        logprobs=lp) for k, ((prompt, c), lp) in enumerate(zip(flat, logprobs, strict=True))]
        return dict(id=f"cmpl-{uuid.uuid4().hex[:24]}", object="text_completion", created=int(time.time()),
                    model=model_name, choices=choices,
                    usage=_usage(sum(row[0].prompt_tokens for row in results),
                                 sum(c.completion_tokens for row in results for c in row)))

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict:
        check_model(req.model)
        prompt = chat_prompt(backend.tokenizer, [m.model_dump() for m in req.messages])
        with lock:
            (row,) = backend.generate([prompt], n=req.n, max_tokens=req.max_tokens, temperature=req.temperature,
                                      stop=req.stop_list(), seed=req.seed)
        choices = [dict(index=j, message=dict(role="assistant", content=c.text), finish_reason=c.finish_reason,
                        logprobs=None) for j, c in enumerate(row)]
        return dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", object="chat.completion", created=int(time.time()),
                    model=model_name, choices=choices,
                    usage=_usage(row[0].prompt_tokens, sum(c.completion_tokens for c in row)))

    return app


def _logprobs(backend: LocalHFBackend, choices: list[tuple[str, Completion]], *, echo: bool,
              top_k: int) -> list[dict]:
    """OpenAI's ``logprobs`` object per (prompt, completion): the completion's tokens, after the prompt's with echo.

    All sequences are scored in one batched call. Offsets are character offsets into ``prompt +
    completion.text``: the prompt's come from the tokenizer's offset mapping, the completion's from
    decoding its growing prefix.
    """
    tok = backend.tokenizer
    sequences, offsets, prompt_lengths = [], [], []
    for prompt, completion in choices:
        if prompt:
            enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
            prompt_ids, starts = enc["input_ids"], [start for start, _ in enc["offset_mapping"]]
        else:  # generation started from the BOS token alone (LocalHFBackend.encode)
            prompt_ids, starts = backend.encode(""), [0]
        cids = completion.token_ids
        sequences.append(prompt_ids + list(cids))
        offsets.append(starts + [len(prompt) + len(backend.decode(cids[:j])) for j in range(len(cids))])
        prompt_lengths.append(len(prompt_ids))
    out = []
    for ids, offs, n_prompt, scores in zip(sequences, offsets, prompt_lengths,
                                            backend.token_logprobs(sequences, top_k=top_k), strict=True):
        logprobs = [None, *scores.logprobs]  # nothing predicts the first token
        top = [None] + [dict(zip(_token_strings(tok, t_ids), t_lps, strict=True))
                        for t_ids, t_lps in zip(scores.top_ids, scores.top_logprobs, strict=True)]
        first = 0 if echo else n_prompt
        out.append(dict(tokens=_token_strings(tok, ids)[first:], token_logprobs=logprobs[first:],
                        top_logprobs=top[first:], text_offset=offs[first:]))
    return out


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id decoded on its own, as OpenAI reports tokens."""
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


# -- running it -------------------------------------------------------------------------------------


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, for uvicorn to serve on; a host that does not resolve or a
    port that is taken is one :class:`~lmlab.errors.ConfigError` line here, not uvicorn's log lines and exit 3."""
    from lmlab.errors import ConfigError

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse the port
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:  # socket.gaierror for a host that does not resolve, EADDRINUSE, EACCES, ...
        if sock is not None:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


@contextlib.contextmanager
def serve_in_thread(app, *, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a daemon thread; yield ``http://127.0.0.1:PORT/v1``.

    Waits until the server accepts connections; on exit asks it to stop (``should_exit``) and joins it.
    """
    import uvicorn

    sock = listening_socket("127.0.0.1", 0)  # bound before the thread starts: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {port} did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@click.command("serve-lm")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--name", default=None, help="Model name clients send (default: MODEL as given).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Prompts per forward pass.")
def serve_lm_command(model: str, host: str, port: int, name: str | None, batch_size: int):
    """Serve MODEL (a local HF folder, a named model or tiny:<preset>) with an OpenAI-compatible API.

    Clients use base URL http://HOST:PORT/v1, e.g. `get_backend("http://127.0.0.1:8000/v1#NAME")`.
    """
    import uvicorn

    from lmlab.errors import ConfigError
    from lmlab.lm import models

    if name is not None and not name.strip():
        raise ConfigError("--name must not be empty: clients send it as the model name")
    sock = listening_socket(host, port)  # before the model loads: a port in use is one line, at once
    with contextlib.closing(sock):
        loaded = models.load(model)
        name = name or model
        app = create_app(LocalHFBackend(loaded.model, loaded.tokenizer, batch_size=batch_size), name)
        click.echo(f"serving {name!r} at http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops)", err=True)
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
