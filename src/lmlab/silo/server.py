"""`lmlab silo serve`: a FastAPI service over a kNN-LM with attribution and opt-out.

SILO (Min, Gururangan et al. 2023, arXiv 2308.04430) motivates a datastore that data owners can opt out of
and whose predictions can be attributed; the paper ships no service, this is ours.

- ``POST /v1/generate``: ``prompt``, ``max_tokens`` (1-512), ``temperature`` (0-2, 0 greedy), ``seed``, ``top``
  (neighbours per token, 0-20), optional ``k`` / ``lmbda`` overrides -> the text and, per generated token, its
  probabilities (kNN-LM, LM, kNN), the datastore's share and the top neighbours (document id, source, licence,
  offset, snippet, share).
- ``POST /v1/score``: ``text`` -> perplexity with and without the datastore (and per-token attribution with
  ``attribute: true``).
- ``POST /v1/optout``: ``doc_ids`` / ``sources`` / ``license_classes``; needs ``Authorization: Bearer <token>``
  where the token is ``$LMLAB_SILO_ADMIN_TOKEN`` (read when the app is created; without it opt-out is
  disabled, 403). Every attempt, allowed or not, is appended to the audit log (JSON lines).
- ``GET /v1/datastore``: counts, index size, tombstones.

Errors are ``{"error": {"message", "type"}}``: 422 for an invalid body (the message names the field), 401/403
for opt-out auth, 400 for a request the model cannot serve (e.g. longer than its positions), 404 for an
opt-out matching nothing, 500 for a failure of the server (e.g. a full disk: an opt-out that fails is audited as
``failed``, leaves the service as the datastore on disk is, and can be retried). One lock serialises model and
index access; FastAPI's threadpool keeps the event loop answering. Before answering, the service checks the
datastore's manifest (one ``stat``) and applies opt-outs that another process (``lmlab silo optout``) wrote
meanwhile; its own opt-outs merge with those on disk.
"""

import hmac
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmlab.errors import DataError

if TYPE_CHECKING:
    from fastapi import FastAPI

ADMIN_ENV = "LMLAB_SILO_ADMIN_TOKEN"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., max_length=20000)
    max_tokens: int = Field(32, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # what torch.Generator.manual_seed accepts
    top: int = Field(3, ge=0, le=20)
    k: int | None = Field(None, ge=1, le=8192)
    lmbda: float | None = Field(None, ge=0.0, le=1.0)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1, max_length=200000)
    attribute: bool = False
    top: int = Field(3, ge=0, le=20)


class OptOutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    doc_ids: list[str] = Field(default_factory=list)
    sources: list[str] = Field(default_factory=list)
    license_classes: list[str] = Field(default_factory=list)
    reason: str = ""

    @model_validator(mode="after")
    def _something(self) -> "OptOutRequest":
        if not (self.doc_ids or self.sources or self.license_classes):
            raise ValueError("give at least one of doc_ids, sources, license_classes")
        return self


class SiloService:
    """The kNN-LM + datastore (+ optional RIC-LM index) behind the API; thread-safe through one lock."""

    def __init__(self, loaded, datastore, config=None, *, ric=None, audit_log: str | os.PathLike | None = None):
        from lmlab.silo.knn_lm import KnnLM, KnnLMConfig

        self.knn = KnnLM(loaded, datastore, config or KnnLMConfig())
        self.datastore, self.ric = datastore, ric
        self.lock = threading.Lock()
        self.audit_log = audit_log_path(datastore.folder, audit_log)

    def sync(self) -> None:
        """Pick up opt-outs another process wrote to the folders (call under ``self.lock``)."""
        self.datastore.refresh()
        if self.ric is not None:
            self.ric.refresh()

    def audit(self, record: dict) -> None:
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}, sort_keys=True)
        with open(self.audit_log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def audit_log_path(datastore_folder: str | os.PathLike, audit_log: str | os.PathLike | None = None) -> Path:
    """Where opt-outs are audited: ``audit_log``, or ``DATASTORE.audit.jsonl`` beside the datastore; DataError if no
    file can be written there (a folder), found before serving rather than at the first opt-out."""
    from lmlab.io import output_file

    folder = Path(os.path.abspath(datastore_folder))  # "." has no name to put ".audit.jsonl" after
    return output_file(audit_log or folder.with_name(folder.name + ".audit.jsonl"), "the audit log")


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def create_app(service: SiloService, *, admin_token: str | None = None) -> "FastAPI":
    """The FastAPI app (module docstring); ``admin_token`` defaults to ``$LMLAB_SILO_ADMIN_TOKEN``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    from lmlab.errors import LmlabError

    token = admin_token if admin_token is not None else os.environ.get(ADMIN_ENV)
    app = FastAPI(title="lmlab silo", summary="kNN-LM over a restricted datastore, with attribution and opt-out")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.exception_handler(LmlabError)
    async def _unservable(request, exc: LmlabError):
        return _error(404 if isinstance(exc, DataError) and "opt-out" in str(exc) else 400, str(exc))

    @app.exception_handler(Exception)
    async def _failed(request, exc: Exception):  # a fault of the server (e.g. a full disk), still in our format
        return _error(500, f"the server failed: {type(exc).__name__}: {exc}")

    @app.post("/v1/generate")
    def generate(req: GenerateRequest) -> dict:
        changes = {k: v for k, v in (("k", req.k), ("lmbda", req.lmbda)) if v is not None}
        knn = service.knn.with_config(**changes) if changes else service.knn
        with service.lock:
            service.sync()
            g = knn.generate(req.prompt, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                             top=req.top)
        return {"prompt": g.prompt, "text": g.text, "config": asdict(knn.config),
                "tokens": [asdict(t) for t in g.tokens]}

    @app.post("/v1/score")
    def score(req: ScoreRequest) -> dict:
        knn = service.knn
        ids = knn.encode([req.text])
        if len(ids) < 2:
            raise DataError("text must have at least 2 tokens to score")
        with service.lock:
            service.sync()
            res = knn.evaluate(ids)
            tokens = [asdict(t) for t in knn.attribute(req.text, top=req.top)] if req.attribute else None
        out = {"tokens_scored": res.n_tokens, "ppl": res.ppl, "ppl_lm": res.ppl_lm, "nll": res.nll,
               "nll_lm": res.nll_lm, "config": asdict(knn.config)}
        if tokens is not None:
            out["tokens"] = tokens
        return out

    @app.post("/v1/optout")
    def optout(req: OptOutRequest, request: Request):
        client = request.client.host if request.client else None
        record = {"event": "optout", "client": client, "request": req.model_dump()}
        if not token:
            service.audit({**record, "outcome": "disabled"})
            return _error(403, f"opt-out is disabled: start the server with ${ADMIN_ENV} set")
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            service.audit({**record, "outcome": "unauthorized"})
            return _error(401, "opt-out needs 'Authorization: Bearer <admin token>'")
        with service.lock:
            rep = None
            try:
                rep = service.datastore.optout(doc_ids=req.doc_ids, sources=req.sources,
                                               license_classes=req.license_classes)
                if service.ric is not None:
                    service.ric.optout(doc_ids=req.doc_ids, sources=req.sources, license_classes=req.license_classes)
            except Exception as e:  # audited too; a retry redoes what is missing (opt-outs are idempotent)
                done = {} if rep is None else {"documents": rep.documents, "entries": rep.entries}  # the datastore's
                service.audit({**record, "outcome": "rejected" if isinstance(e, LmlabError) else "failed",
                               "message": str(e), **done})
                raise
            service.audit({**record, "outcome": "removed", "documents": rep.documents, "entries": rep.entries})
        return asdict(rep)

    @app.get("/v1/datastore")
    def stats() -> dict:
        with service.lock:
            service.sync()
            return service.datastore.stats()

    return app
