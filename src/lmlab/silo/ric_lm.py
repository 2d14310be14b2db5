"""RIC-LM: retrieval-in-context over a restricted datastore, the second nonparametric method of SILO.

Paper: Min, Gururangan et al., "SILO Language Models: Isolating Legal Risk In a Nonparametric Datastore"
(arXiv 2308.04430), Sec. 3.2 "Retrieval-in-context LM" (after Ram et al. 2023, "In-Context Retrieval-Augmented
Language Models", arXiv 2302.00083, and Shi et al. 2023, REPLUG). Official code: kernelmachine/silo-lm
``scripts/doc_retrieval.py`` (pyserini BM25).

What is implemented: the datastore corpus is cut into fixed-size token *blocks* (silo-lm
``max_retrieval_seq_length``); a BM25 index over their text (``bm25s``). For each evaluation window (SILO's
strided windows, ``lmlab.lm.score.sliding_windows``) the query is the window's *context* tokens, the ones it
does not score (silo-lm: ``query_ids = input_ids where targets == pad``); the top ``n_blocks`` blocks are
prepended (silo-lm ``concat_k = (2048 - max_seq_length) // max_retrieval_seq_length``, i.e. retrieved
tokens + window <= the model's context budget) and only the window's own targets are scored. A window with
no context (the first) gets no retrieval, as in silo-lm.

Deviations: blocks do not cross document boundaries (so each block has one document's provenance; the
last block of a document may be shorter); BM25 is bm25s (Lucene-like scoring, English stopwords) instead of
pyserini; opted-out documents' blocks are masked at retrieval (``weight_mask``). As for the datastore, opt-outs
take the folder's lock and merge with the manifest on disk, and rebuilding an index keeps its opt-outs.

Shape legend: B blocks, b windows in a batch, T tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.io import atomic_dir, check_sizes, read_manifest, write_json_atomic, write_manifest

KIND = "silo-ric-index"


@dataclass(frozen=True)
class RicLMConfig:
    block_tokens: int = 256  # retrieved block length (silo-lm max_retrieval_seq_length 1024 at a 2048 budget)
    n_blocks: int = 1  # blocks prepended (silo-lm concat_k = 1)
    window: int = 512  # evaluation window; n_blocks * block_tokens + window <= max_position_embeddings
    stride: int = 256  # silo-lm stride = window / 2
    batch_size: int = 8

    def __post_init__(self):
        self.validate()

    def validate(self, max_positions: int | None = None) -> None:
        if self.block_tokens < 1 or self.n_blocks < 0 or self.batch_size < 1:
            raise ConfigError("block_tokens and batch_size must be >= 1 and n_blocks >= 0")
        if self.window < 1:
            raise ConfigError(f"window must be at least 1; got {self.window}")
        if not 0 < self.stride <= self.window:
            raise ConfigError(f"need 0 < stride <= window; got stride {self.stride}, window {self.window}")
        budget = self.n_blocks * self.block_tokens + self.window
        if max_positions is not None and budget > max_positions:
            raise ConfigError(f"n_blocks x block_tokens + window = {budget} exceeds the model's {max_positions} "
                              "positions: use fewer/shorter blocks or a shorter window")


@dataclass
class RicLMResult:
    ppl: float
    nll: float
    n_tokens: int
    token_nll: torch.Tensor  # (N-1,) aligned with positions 1..N-1
    retrieved: list[list[int]] = field(default_factory=list)  # block ids prepended to each window


def _bm25_tokenize(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)


class RicLM:
    """A BM25 index over token blocks of the datastore corpus, and RIC-LM evaluation with it."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self._seen = None  # the manifest file this object last read (refresh)
        self._load()

    def _load(self) -> None:
        import bm25s

        from lmlab.silo.datastore import DocInfo, _readable

        folder = self.folder
        check_sizes(folder, self.manifest)
        with _readable(folder, "blocks.npz"), np.load(folder / "blocks.npz") as z:
            self.tokens, self.starts = z["tokens"], z["starts"]  # block b = tokens[starts[b]:starts[b + 1]]
            self.block_doc, self.block_offset = z["doc"], z["offset"]
        with _readable(folder, "docs.jsonl"), open(folder / "docs.jsonl", encoding="utf-8") as f:
            self.docs = [DocInfo(**json.loads(line)) for line in f]
        with _readable(folder, "bm25"):
            self.bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        self.removed_docs = np.zeros(len(self.docs), bool)
        self._apply_tombstones()

    @property
    def n_blocks(self) -> int:
        return len(self.block_doc)

    def block_ids(self, b: int) -> list[int]:
        return self.tokens[self.starts[b]:self.starts[b + 1]].tolist()

    @classmethod
    def build(cls, docs: Iterable, tokenizer, out: str | os.PathLike, *, block_tokens: int = 256) -> RicLM:
        """Cut ``docs`` (objects with .id .text .source .license .license_class) into blocks and index them.

        Over an existing RIC-LM index its opt-out tombstones are kept; any other non-empty folder is refused.
        """
        import bm25s

        from lmlab.silo.datastore import _abs, _doc_info, carried_tombstones, existing_artefact, tokenizer_fingerprint

        if block_tokens < 1:
            raise ConfigError("block_tokens must be at least 1")
        out = _abs(out)
        existing_artefact(out, KIND)
        tokens, starts, bdoc, boff, infos, texts = [], [0], [], [], [], []
        for i, d in enumerate(docs):
            ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
            infos.append(asdict(_doc_info(d)) | {"n_tokens": len(ids)})
            for o in range(0, len(ids), block_tokens):
                blk = ids[o:o + block_tokens]
                tokens.extend(blk)
                starts.append(len(tokens))
                bdoc.append(i)
                boff.append(o)
                texts.append(tokenizer.decode(blk))
        if not texts:
            raise DataError("no text to index for RIC-LM")
        terms = _bm25_tokenize(texts)
        if not any(terms):
            raise DataError("no block of the corpus has a word BM25 can index (blank, punctuation or stopwords "
                            "only): give RIC-LM documents with text")
        with contextlib.ExitStack() as hold, atomic_dir(out) as tmp:  # hold: released after the swap
            np.savez(tmp / "blocks.npz", tokens=np.asarray(tokens, np.int32), starts=np.asarray(starts, np.int64),
                     doc=np.asarray(bdoc, np.int32), offset=np.asarray(boff, np.int32))
            (tmp / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in infos), encoding="utf-8")
            retriever = bm25s.BM25()
            retriever.index(terms, show_progress=False)
            retriever.save(str(tmp / "bm25"), show_progress=False)
            write_manifest(tmp, {"kind": KIND, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                 "block_tokens": block_tokens, "blocks": len(bdoc), "documents": len(infos),
                                 "tombstones": carried_tombstones(out, KIND, hold)})
        return cls.load(out)

    @classmethod
    def load(cls, folder: str | os.PathLike, tokenizer=None) -> RicLM:
        from lmlab.silo.datastore import _abs, tokenizer_fingerprint

        folder = _abs(folder)
        manifest = read_manifest(folder)
        if manifest.get("kind") != KIND:
            raise ManifestMismatchError(f"{folder} is a {manifest.get('kind')!r}, not a {KIND}")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != manifest["tokenizer_fingerprint"]:
            raise ManifestMismatchError(f"{folder} was built with another tokenizer: rebuild it for this model")
        return cls(folder, manifest)

    def _apply_tombstones(self) -> None:
        from lmlab.silo.datastore import match_documents

        t = self.manifest.get("tombstones", {})
        self.removed_docs = match_documents(self.docs, t.get("doc_ids", ()), t.get("sources", ()),
                                            t.get("license_classes", ()))

    def refresh(self) -> bool:
        """Apply opt-outs another process wrote to the manifest since (reload the folder if it was rebuilt)."""
        from lmlab.silo.datastore import _build_identity, manifest_stamp, merge_tombstones

        stamp = manifest_stamp(self.folder)
        if stamp is None or stamp == self._seen:
            return False
        manifest = read_manifest(self.folder)
        tombstones = merge_tombstones(self.manifest.get("tombstones", {}), manifest.get("tombstones", {}))
        rebuilt = _build_identity(manifest) != _build_identity(self.manifest)
        if rebuilt:  # read into a new object first: an interrupted read leaves this one as it was
            self.__dict__.update(RicLM(self.folder, {**manifest, "tombstones": tombstones}).__dict__)
        else:
            self.manifest = {**manifest, "tombstones": tombstones}
            self._apply_tombstones()
        self._seen = stamp
        return True

    def optout(self, *, doc_ids: Iterable[str] = (), sources: Iterable[str] = (),
               license_classes: Iterable[str] = ()) -> int:
        """Tombstone documents (same matching as the datastore's opt-out); returns how many blocks it masks.

        Under the folder's opt-out lock, merged with the manifest on disk (no other process's opt-out is lost)."""
        from lmlab.silo.datastore import check_optout_request, folder_lock, manifest_stamp, merge_tombstones

        doc_ids, sources, license_classes = check_optout_request(doc_ids, sources, license_classes)
        with folder_lock(self.folder):
            self.refresh()
            before = int(self.removed_docs[self.block_doc].sum())
            t = merge_tombstones(self.manifest.get("tombstones", {}), {
                "doc_ids": doc_ids, "sources": sources, "license_classes": license_classes})
            old, self.manifest = self.manifest, {**self.manifest, "tombstones": t}
            try:
                self._apply_tombstones()
                write_json_atomic(self.folder / "manifest.json", self.manifest)
            except BaseException:  # not persisted: do not report (or count on a retry) what a restart would undo
                self.manifest = old
                self._apply_tombstones()
                raise
            self._seen = manifest_stamp(self.folder)
        return int(self.removed_docs[self.block_doc].sum()) - before

    def retrieve(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Top-``k`` (block, BM25 score) per query, skipping opted-out documents and zero-score blocks."""
        out: list[list[tuple[int, float]]] = [[] for _ in queries]
        toks = _bm25_tokenize(queries)
        todo = [i for i, t in enumerate(toks) if t]
        if not todo or k < 1:
            return out
        live = (~self.removed_docs[self.block_doc]).astype(np.float32)
        kk = min(k, self.n_blocks)
        res, scores = self.bm25.retrieve([toks[i] for i in todo], k=kk, show_progress=False, weight_mask=live,
                                         n_threads=0)
        for row, i in enumerate(todo):
            out[i] = [(int(b), float(s)) for b, s in zip(res[row], scores[row], strict=True)
                      if s > 0 and live[int(b)] > 0]
        return out

    def blocks_for(self, block_scores: list[tuple[int, float]], tokenizer, *, snippet_chars: int = 200) -> list:
        from lmlab.silo.attribution import Block

        out = []
        for b, s in block_scores:
            d = self.docs[int(self.block_doc[b])]
            out.append(Block(block=b, doc_id=d.id, source=d.source, license=d.license, license_class=d.license_class,
                             offset=int(self.block_offset[b]), score=s,
                             snippet=tokenizer.decode(self.block_ids(b))[:snippet_chars]))
        return out

    @torch.no_grad()
    def evaluate(self, model, tokenizer, ids, config: RicLMConfig = RicLMConfig(), *,
                 progress: bool = False) -> RicLMResult:
        """RIC-LM perplexity of one token sequence: blocks retrieved by each window's context are prepended."""
        from tqdm.auto import tqdm

        from lmlab.lm.score import sliding_windows

        config.validate(getattr(model.config, "max_position_embeddings", None))
        ids = torch.as_tensor(ids, dtype=torch.long)
        if len(ids) < 2:
            raise DataError("need at least 2 tokens to evaluate")
        device = next(model.parameters()).device
        windows = sliding_windows(len(ids), window=config.window, stride=config.stride)
        queries = [tokenizer.decode(ids[w.begin:w.score_from].tolist()) if w.score_from > w.begin + 1 else ""
                   for w in windows]
        hits = self.retrieve(queries, config.n_blocks)
        token_nll = torch.empty(len(ids) - 1, dtype=torch.float32)
        retrieved = [[b for b, _ in h] for h in hits]
        for s in tqdm(range(0, len(windows), config.batch_size), disable=not progress, desc="ric-lm"):
            group = list(range(s, min(s + config.batch_size, len(windows))))
            rows, prefix = [], []
            for g in group:
                w = windows[g]
                ctx = [t for b in reversed(retrieved[g]) for t in self.block_ids(b)]  # best block nearest the window
                prefix.append(len(ctx))
                rows.append(torch.cat([torch.as_tensor(ctx, dtype=torch.long), ids[w.inputs]]))
            length = max(len(r) for r in rows)
            x = torch.stack([F.pad(r, (0, length - len(r))) for r in rows]).to(device)  # right-padded: causal
            logits = model(x).logits  # (b, T, V)
            for row, g in enumerate(group):
                w = windows[g]
                pos = prefix[row] + torch.arange(w.score_from - 1 - w.begin, w.end - 1 - w.begin, device=logits.device)
                lp = torch.log_softmax(logits[row, pos].float(), -1)
                tgt = ids[w.targets]
                token_nll[w.score_from - 1:w.end - 1] = -lp.gather(-1, tgt[:, None].to(lp.device)).squeeze(-1).cpu()
        nll = token_nll.double().sum().item()
        n = token_nll.numel()
        return RicLMResult(ppl=math.exp(nll / n), nll=nll, n_tokens=n, token_nll=token_nll, retrieved=retrieved)
