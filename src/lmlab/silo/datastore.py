"""The SILO datastore: (key, value, provenance) for every token of a restricted corpus, indexed with faiss.

Paper: Min, Gururangan, Wallace, Hajishirzi, Smith, Zettlemoyer, "SILO Language Models: Isolating Legal Risk In a
Nonparametric Datastore" (arXiv 2308.04430), Sec. 3.2 (the datastore of kNN-LM, after Khandelwal et al. 2020,
"Generalization through Memorization: Nearest Neighbor Language Models", arXiv 1911.00172).
Official code: kernelmachine/silo-lm (``scripts/model.py`` encodes, ``scripts/index.py`` indexes);
urvashik/knnlm.

What is implemented: for every target token ``x_t`` of the datastore corpus (documents joined into one stream
with EOS separators, read in SILO's strided windows), key ``k_t`` = the model's hidden state at position
``t - 1`` at a configurable *key point*, value ``v_t = x_t``, provenance = (document, token offset in it).

- Key point ``final`` (default) is ``hidden_states[-1]``, the vector the LM head reads (SILO:
  ``outputs.hidden_states[-1]``); ``MODULE:input`` / ``MODULE:output`` read any module through
  :mod:`lmlab.lm.hooks`, e.g. ``model.layers.3.mlp:input`` is Khandelwal et al.'s "input to the final FFN".
- Index: a faiss factory string. ``Flat`` (exact, default) is wrapped in ``IDMap2`` so that opt-out can remove
  entries without renumbering them; ``IVF4096,PQ64`` is silo-lm's large-store setting (nprobe 8, 1M training
  samples, silo-lm ``index.py``); ``PQ32x4fs`` (4-bit fast-scan PQ) searches ~5x faster at k = 1024 on CPU for
  coarser distances; ``auto`` picks by size (:func:`auto_factory`). An IVF search probes enough lists to hold
  ~2k vectors (:meth:`Datastore.probes_for`), so a large k is never silently cut short. Keys are also kept
  as fp16 in ``keys.f16`` (a memmap, like silo-lm's ``embed.float16.npy``) for exact re-scoring of
  approximate neighbours.
- Building is batched (``iter_window_logprobs``) with a progress bar, in *chunks* of documents; each finished
  chunk is written atomically to ``parts/``, so an interrupted build resumes without redoing or duplicating
  chunks. ``shard=(i, n)`` encodes only the chunks ``c % n == i``; :func:`merge_shards` joins shards.
- ``manifest.json``: model spec and weight fingerprint, tokenizer fingerprint, key point, dimension, counts,
  window/stride, index factory, checksums, and the opt-out tombstones. :meth:`Datastore.load` with another
  model or tokenizer raises :class:`~lmlab.errors.ManifestMismatchError`.
- Opt-out (:meth:`Datastore.optout`): by document id, source (or group) or licence class; entries leave the
  index (``remove_ids``) and the tombstones go into the manifest; both files are replaced atomically, and on
  load the tombstones are re-applied and also masked at search time, so a crash between the two writes
  never resurrects a removed document. Opt-outs take a file lock (``.optout.lock`` in the folder) and merge with
  the manifest on disk, so two processes (a server and ``lmlab silo optout``) never lose each other's;
  :meth:`Datastore.refresh` lets a long-lived process pick up opt-outs made by another. Rebuilding over an
  existing datastore keeps its tombstones (an opt-out is for good), and a build never replaces a folder that is
  not a datastore.

Deviations: context windows do not cross chunk boundaries (a chunk is ``docs_per_chunk`` documents);
SILO joins documents without a separator, we put EOS between them (as :func:`lmlab.lm.score.perplexity_of_texts`).

Shape legend: N entries, D key width, K neighbours, n queries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.io import (
    MANIFEST,
    atomic_dir,
    check_sizes,
    read_manifest,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_manifest,
)
from lmlab.io import existing_artefact as io_existing_artefact

KIND = "silo-datastore"
SHARD_KIND = "silo-datastore-shard"
FORMAT_VERSION = 1
KEYS = "keys.f16"
INDEX = "index.faiss"
LOCK = ".optout.lock"
NO_TOMBSTONES = {"doc_ids": [], "sources": [], "license_classes": []}

log = logging.getLogger("lmlab.silo")


@dataclass(frozen=True)
class DatastoreConfig:
    key_point: str = "final"  # "final" = hidden_states[-1] (silo-lm), or "MODULE:input|output" via hooks
    window: int = 1024  # tokens the model reads per window (silo-lm max_seq_length)
    stride: int = 512  # silo-lm stride
    batch_size: int = 8  # windows per forward (silo-lm batch_size)
    docs_per_chunk: int = 64  # unit of resume and sharding
    factory: str = "Flat"  # faiss index_factory string; "IVF4096,PQ64" is silo-lm's; "auto": by size (auto_factory)
    nprobe: int = 8  # silo-lm probe
    train_size: int = 1_000_000  # vectors sampled to train an IVF/PQ index (silo-lm sample_size; >= 39 nlist)
    add_batch: int = 1_000_000  # vectors added per call (silo-lm num_keys_to_add_at_a_time)
    seed: int = 1  # sampling / training seed (silo-lm np.random.seed(1) before training)

    def __post_init__(self):
        self.validate()

    def validate(self, dim: int | None = None) -> None:
        """Check the options; with the key width ``dim``, also that faiss can build ``factory`` (before encoding)."""
        if self.window < 2 or not 0 < self.stride <= self.window:
            raise ConfigError(f"need window >= 2 and 0 < stride <= window; got window {self.window}, "
                              f"stride {self.stride}")
        for name in ("docs_per_chunk", "batch_size", "nprobe", "train_size", "add_batch"):
            if getattr(self, name) < 1:  # nprobe 0: an IVF search that probes no list finds nothing
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        parse_key_point(self.key_point)
        if dim is not None:
            check_factory(self.factory, dim)


@dataclass(frozen=True)
class DocInfo:
    """Provenance of one datastore document (its row in ``docs.jsonl``)."""

    id: str
    source: str
    license: str
    license_class: str
    group: str
    n_tokens: int


@dataclass
class SearchResult:
    D: np.ndarray  # (n, K) float32 squared L2 distances (inf where no neighbour)
    I: np.ndarray  # (n, K) int64 entry ids (-1 where no neighbour)  # noqa: E741


@dataclass
class OptOutReport:
    documents: int  # documents newly removed
    entries: int  # datastore entries newly removed
    live_entries: int  # entries left
    tombstones: dict = field(default_factory=dict)


# -- model / key point identity --------------------------------------------------------------------


def parse_key_point(key_point: str) -> tuple[str, str]:
    """``"final"`` -> ("final", ""); ``"model.layers.1.mlp:input"`` -> (module, "input")."""
    if key_point == "final":
        return "final", ""
    module, _, where = key_point.rpartition(":")
    if not module or where not in ("input", "output"):
        raise ConfigError(f"key point {key_point!r}: use 'final' or 'MODULE:input' / 'MODULE:output' "
                          "(e.g. 'model.layers.3.mlp:input')")
    return module, where


def model_fingerprint(model) -> str:
    """A short hash of the model's config and the first values of every parameter: tells checkpoints apart."""
    import torch

    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        keep = {k: d.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                      "intermediate_size", "num_attention_heads")}
        h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    from lmlab.lm.data import tokenizer_fingerprint as fp

    return fp(tokenizer)


def key_dim(model, key_point: str) -> int:
    import torch

    module, where = parse_key_point(key_point)
    if module == "final":
        return int(model.config.hidden_size)
    from lmlab.lm.hooks import capture

    with capture(model, module, what=where) as cap, torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    return int(cap[module].shape[-1])


@dataclass
class ScoredKeys:
    """One evaluation window: targets, their log p_LM over V, and the query keys at the key point."""

    window: object  # lmlab.lm.score.Window
    target_ids: object  # (n,) torch.long
    logprobs: object  # (n, V) torch.float32
    keys: object  # (n, D) torch tensor


def iter_scored_keys(model, ids, *, key_point: str = "final", window: int = 1024, stride: int = 512,
                     batch_size: int = 8, logprobs: bool = True, progress: bool = False) -> Iterator[ScoredKeys]:
    """``lmlab.lm.score.iter_window_logprobs`` plus the key of every scored position (keys at ``key_point``).

    ``logprobs=False`` (a datastore build) skips the LM head: ``ScoredKeys.logprobs`` is then None.
    """
    from lmlab.lm.score import iter_window_logprobs

    module, where = parse_key_point(key_point)
    if module == "final":
        for wl in iter_window_logprobs(model, ids, window=window, stride=stride, batch_size=batch_size,
                                       output_hidden_states=True, logprobs=logprobs, progress=progress):
            yield ScoredKeys(wl.window, wl.target_ids, wl.logprobs, wl.hidden_states)
        return
    from lmlab.lm.hooks import capture

    with capture(model, module, what=where) as cap:
        seen, row = None, 0
        for wl in iter_window_logprobs(model, ids, window=window, stride=stride, batch_size=batch_size,
                                       logprobs=logprobs, progress=progress):
            batch = cap[module]  # (b, T, D): the batch this window came from
            if batch is not seen:
                seen, row = batch, 0
            w = wl.window
            keys = batch[row, w.score_from - 1 - w.begin:w.end - 1 - w.begin]  # logit at t-1 predicts x_t
            row += 1
            yield ScoredKeys(w, wl.target_ids, wl.logprobs, keys)


# -- building ---------------------------------------------------------------------------------------


def _doc_info(doc) -> DocInfo:
    meta = getattr(doc, "meta", None) or {}
    return DocInfo(id=str(doc.id), source=str(doc.source), license=str(doc.license),
                   license_class=str(doc.license_class), group=str(meta.get("group") or doc.source), n_tokens=0)


def _chunks(docs: Iterable, size: int) -> Iterator[tuple[int, int, list]]:
    """(chunk index, index of its first document, documents)."""
    buf, first, c = [], 0, 0
    for i, doc in enumerate(docs):
        if not buf:
            first = i
        buf.append(doc)
        if len(buf) == size:
            yield c, first, buf
            buf, c = [], c + 1
    if buf:
        yield c, first, buf


def _stream(token_lists: list[list[int]], eos: int, first_doc: int) -> tuple[np.ndarray, ...]:
    """Documents joined with EOS; each position's (document index, offset). EOS belongs to the document before."""
    parts, docs, offs = [], [], []
    for j, toks in enumerate(token_lists):
        n = len(toks)
        sep = [eos] if j < len(token_lists) - 1 else []
        parts.append(np.asarray(list(toks) + sep, dtype=np.int64))
        docs.append(np.full(n + len(sep), first_doc + j, dtype=np.int32))
        offs.append(np.arange(n + len(sep), dtype=np.int32))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(parts), np.concatenate(docs), np.concatenate(offs)


def _chunk_fingerprint(chunk: list) -> str:
    """What a part is encoded from: its documents' provenance and text. A build resumed with another selection
    of documents (other licence classes, --max-docs) must not reuse a part of the interrupted one."""
    h = hashlib.sha256()
    for d in chunk:
        h.update(json.dumps(asdict(_doc_info(d)), sort_keys=True).encode())
        h.update(hashlib.sha256(str(d.text).encode()).digest())
    return h.hexdigest()


def _finished_entries(part: Path, fingerprint: str) -> int | None:
    """How many entries a finished part holds if it was encoded from the documents with ``fingerprint``; None if
    it was not, has no fingerprint, or cannot be read (redo it)."""
    try:
        with np.load(part) as z:
            if "fingerprint" not in z.files or z["fingerprint"].tobytes().decode() != fingerprint:
                return None
            return len(z["values"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _build_info(loaded, config: DatastoreConfig) -> dict:
    return dict(model=loaded.spec, model_fingerprint=model_fingerprint(loaded.model),
                tokenizer_fingerprint=tokenizer_fingerprint(loaded.tokenizer), key_point=config.key_point,
                dim=key_dim(loaded.model, config.key_point), vocab_size=len(loaded.tokenizer),
                window=config.window, stride=config.stride, docs_per_chunk=config.docs_per_chunk)


def encode_parts(docs: Iterable, loaded, parts_dir: str | os.PathLike, config: DatastoreConfig = DatastoreConfig(),
                 *, shard: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Encode the chunks of ``docs`` this shard owns into ``parts_dir`` (resumable); returns the build info.

    ``docs`` yields objects with ``.id .text .source .license .license_class`` (and optionally ``.meta``), in
    a stable order. Each chunk's part is written atomically when done and skipped on a rerun if it was encoded
    from the same documents (:func:`_chunk_fingerprint`) with the same model and settings, else encoded again;
    ``build.json`` records the whole selection's fingerprint, which shards must agree on.
    """
    import torch
    from tqdm.auto import tqdm

    i_shard, n_shards = shard or (0, 1)
    if not 0 <= i_shard < n_shards:
        raise ConfigError(f"shard must be i/n with 0 <= i < n; got {i_shard}/{n_shards}")
    parts_dir = Path(parts_dir)
    info = {**_build_info(loaded, config), "shard": [i_shard, n_shards]}
    config.validate(info["dim"])  # a bad factory string fails now, not after the whole corpus is encoded
    parts_dir.mkdir(parents=True, exist_ok=True)
    state = parts_dir / "build.json"
    if state.is_file():
        old = json.loads(state.read_text())
        diff = [k for k in info if old.get(k) != info[k]]
        if diff:
            raise ManifestMismatchError(f"{parts_dir} holds a build with other settings ({', '.join(diff)}): "
                                        "use another output folder or delete it")
    write_json_atomic(state, info)  # not complete until this run is: its parts may change (another selection)
    # a part records its settings too: parts left without build.json (e.g. by an interrupted clean-up) are not
    # taken for another model's
    settings = json.dumps({k: v for k, v in info.items() if k != "shard"}, sort_keys=True)
    model, tok = loaded.model, loaded.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents with")
    n_chunks = n_docs = n_entries = redone = 0
    selection = hashlib.sha256()  # every shard reads every document: all shards compute the same fingerprint
    bar = tqdm(desc="datastore", unit="tok", disable=not progress)
    with torch.no_grad():
        for c, first, chunk in _chunks(docs, config.docs_per_chunk):
            n_chunks = c + 1
            n_docs = first + len(chunk)
            fingerprint = _chunk_fingerprint(chunk)
            selection.update(fingerprint.encode())
            if c % n_shards != i_shard:
                continue
            made_from = hashlib.sha256((settings + fingerprint).encode()).hexdigest()  # these documents, this model
            done = parts_dir / f"part-{c:07d}.npz"
            if done.is_file():
                if (entries := _finished_entries(done, made_from)) is not None:
                    n_entries += entries
                    continue
                redone += 1  # encoded from other documents (the selection changed since the interrupted run) or model
            token_lists = tok([d.text for d in chunk], add_special_tokens=False)["input_ids"]
            infos = [asdict(_doc_info(d)) | {"n_tokens": len(t)} for d, t in zip(chunk, token_lists, strict=True)]
            ids, doc_of, off_of = _stream(token_lists, eos, first)
            keys, values, dpos = [], [], []
            if len(ids) >= 2:
                for sk in iter_scored_keys(model, torch.as_tensor(ids), key_point=config.key_point,
                                           window=config.window, stride=config.stride,
                                           batch_size=config.batch_size, logprobs=False):
                    w = sk.window
                    keys.append(sk.keys.float().cpu().numpy().astype(np.float16))
                    values.append(ids[w.score_from:w.end])
                    dpos.append(np.arange(w.score_from, w.end))
                    bar.update(w.n_scored)
            dim = info["dim"]
            pos = np.concatenate(dpos) if dpos else np.zeros(0, np.int64)
            arrays = dict(keys=np.concatenate(keys) if keys else np.zeros((0, dim), np.float16),
                          values=(np.concatenate(values) if values else np.zeros(0)).astype(np.int32),
                          doc=doc_of[pos].astype(np.int32), offset=off_of[pos].astype(np.int32),
                          docs=np.frombuffer(json.dumps(infos).encode(), dtype=np.uint8),
                          fingerprint=np.frombuffer(made_from.encode(), dtype=np.uint8))
            tmp = parts_dir / f".part-{c:07d}.tmp.npz"
            try:
                np.savez(tmp, **arrays)
                os.replace(tmp, done)
            except BaseException:  # no half-written file left in a shard folder
                tmp.unlink(missing_ok=True)
                raise
            n_entries += len(arrays["values"])
    bar.close()
    for p in parts_dir.glob("part-*.npz"):  # chunks past the end: left by a run over more documents
        number = p.stem.removeprefix("part-")
        if number.isdigit() and int(number) >= n_chunks:
            p.unlink()
            redone += 1
    if redone:
        log.warning("%s: %d chunk(s) were encoded from other documents or settings than this run's: encoded them again",
                    parts_dir, redone)
    done = {"chunks": n_chunks, "documents": n_docs, "corpus_fingerprint": selection.hexdigest()}
    write_json_atomic(parts_dir / "build.json", {**info, "complete": True, **done})
    return {**info, **done, "entries_this_shard": n_entries}


def _read_parts(parts_dirs: list[Path]) -> tuple[dict, list[Path]]:
    infos = [json.loads((d / "build.json").read_text()) for d in parts_dirs if (d / "build.json").is_file()]
    if len(infos) != len(parts_dirs):
        raise DataError("a shard folder has no build.json: it was not written by encode_parts")
    if not all(i.get("complete") for i in infos):
        bad = [str(d) for d, i in zip(parts_dirs, infos, strict=True) if not i.get("complete")]
        raise DataError(f"unfinished shard(s) {', '.join(bad)}: rerun their build to resume it")
    keys = ("model_fingerprint", "tokenizer_fingerprint", "key_point", "dim", "window", "stride",
            "docs_per_chunk", "chunks", "documents", "corpus_fingerprint")
    for k in keys:
        if len({json.dumps(i.get(k)) for i in infos}) > 1:
            raise ManifestMismatchError(f"shards disagree on {k}: they were built from different documents, "
                                        "models or settings")
    n_shards = {i["shard"][1] for i in infos}
    got = sorted(i["shard"][0] for i in infos)
    if len(n_shards) != 1 or got != list(range(next(iter(n_shards)))):
        raise DataError(f"shards {got} of {sorted(n_shards)} given: pass every shard i/n exactly once")
    files = sorted((p for d in parts_dirs for p in d.glob("part-*.npz")), key=lambda p: p.name)
    if len(files) != infos[0]["chunks"]:
        raise DataError(f"found {len(files)} finished chunks of {infos[0]['chunks']}: a shard is incomplete")
    return infos[0], files


def shard_settings(shards: list[str | os.PathLike]) -> dict:
    """The build settings (model, key point, window, stride, docs_per_chunk...) that shard folders agree on; the
    errors :func:`merge_shards` would raise for shards that are unfinished, incomplete or disagree."""
    return _read_parts([Path(s) for s in shards])[0]


def auto_factory(n: int, dim: int) -> str:
    """A faiss factory string for ``n`` vectors of ``dim``: exact ``Flat`` up to 200k entries (a search scans
    < 100 MB), then ``IVF<nlist>,Flat`` with nlist ~ 4 sqrt(n) (faiss's guideline; a power of two) up to 5M,
    then ``IVF<nlist>,PQ<m>`` with m the largest divisor of ``dim`` up to 64 bytes a vector (silo-lm: PQ64)."""
    if n <= 200_000:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    if n <= 5_000_000:
        return f"IVF{nlist},Flat"
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m}"


def _ivf_of(index):
    """The IVF index inside ``index``, or None (Flat, PQ, SQ, HNSW... have no inverted lists)."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _new_index(factory: str, dim: int):
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    if _ivf_of(index) is not None:  # IVF indexes keep explicit ids: remove_ids does not renumber
        return index
    return faiss.IndexIDMap2(index)


def _faiss_reason(e: Exception) -> str:
    """The last line of a faiss exception ("Error: 'd % M == 0' failed"), without its C++ file and function."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.split(": ", 1)[1] if last.startswith("Error in ") and ": " in last else last


def check_factory(factory: str, dim: int) -> None:
    """Refuse a factory string faiss cannot build for ``dim``-wide keys, and an index that cannot remove entries
    (HNSW): opt-out is a promise of the datastore, so it must work on every index we build."""
    if factory == "auto":
        return
    try:
        index = _new_index(factory, dim)
    except RuntimeError as e:
        raise ConfigError(f"faiss cannot build index {factory!r} for {dim}-wide keys ({_faiss_reason(e)}): use a "
                          "faiss index_factory string such as Flat, IVF4096,Flat or IVF4096,PQ64") from None
    try:
        index.remove_ids(np.zeros(0, np.int64))
    except RuntimeError:
        raise ConfigError(f"index {factory!r} cannot remove entries, so documents could not be opted out: use "
                          "Flat, an IVF index (IVF4096,Flat / IVF4096,PQ64), PQ or SQ") from None


# -- rebuilding over an existing folder ------------------------------------------------------------


def _abs(path: str | os.PathLike) -> Path:
    """An absolute, normalised path: ``.`` or ``ds/..`` have no name to derive the sibling folders from."""
    return Path(os.path.abspath(path))


def merge_tombstones(*tombstones: dict) -> dict:
    """The union of opt-out tombstones (doc ids, sources, licence classes): an opt-out is never undone."""
    return {k: sorted(set().union(*(t.get(k, ()) for t in tombstones))) for k in NO_TOMBSTONES}


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive ``flock`` on ``folder/.optout.lock``, across processes: opt-outs (and a rebuild's swap) one at
    a time. A rebuild replaces the folder, so a lock taken on the old folder's file is taken again."""
    import fcntl

    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def existing_artefact(out: Path, kind: str) -> dict | None:
    """The manifest at ``out`` if it is a ``kind`` (a rebuild, which keeps its opt-outs); None if ``out`` is absent
    or an empty folder. Anything else is refused: a build replaces ``out``, and that folder is not ours to delete."""
    return io_existing_artefact(out, kind, ignore={LOCK}, broken_hint=f"; its opt-outs cannot be kept through a "
                                f"rebuild: fix or remove {out} first")


def carried_tombstones(out: Path, kind: str, hold: contextlib.ExitStack) -> dict:
    """The opt-outs of the ``kind`` being rebuilt at ``out`` (none for a new folder), read under its opt-out lock,
    which ``hold`` keeps until the new folder is in place, so that an opt-out made meanwhile is not lost either."""
    if not out.is_dir():
        return merge_tombstones()
    hold.enter_context(folder_lock(out))
    old = existing_artefact(out, kind)
    tombstones = merge_tombstones(old.get("tombstones", {}) if old else {})
    if any(tombstones.values()):
        log.warning("%s: kept the opt-outs of the previous build (%s)", out,
                    "; ".join(f"{k}: {', '.join(v)}" for k, v in tombstones.items() if v))
    return tombstones


def finalize(parts_dirs: list[str | os.PathLike], out: str | os.PathLike, config: DatastoreConfig,
             *, progress: bool = True) -> Datastore:
    """Assemble finished parts into a datastore folder at ``out`` (keys, values, provenance, index, manifest).

    Over an existing datastore, its opt-out tombstones are carried into the new one and applied; any other
    non-empty folder at ``out`` is refused.
    """
    import faiss
    from tqdm.auto import tqdm

    parts_dirs = [Path(p) for p in parts_dirs]
    out = _abs(out)
    info, files = _read_parts(parts_dirs)
    info = {k: v for k, v in info.items() if k not in ("shard", "complete")}
    dim = info["dim"]
    config.validate(dim)
    existing_artefact(out, KIND)  # refuse now, before the work
    with contextlib.ExitStack() as hold, atomic_dir(out) as tmp:  # hold: released after the swap
        sizes = []
        for f in files:
            with np.load(f) as z:
                sizes.append(len(z["values"]))
        n = int(sum(sizes))
        if n == 0:
            raise DataError("the datastore corpus gave no tokens: check the documents")
        keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.float16, shape=(n, dim))
        values = np.empty(n, np.int32)
        doc = np.empty(n, np.int32)
        offset = np.empty(n, np.int32)
        docs: list[dict] = []
        at = 0
        for f, size in zip(files, sizes, strict=True):
            with np.load(f) as z:
                keys[at:at + size] = z["keys"]
                values[at:at + size] = z["values"]
                doc[at:at + size] = z["doc"]
                offset[at:at + size] = z["offset"]
                docs.extend(json.loads(z["docs"].tobytes().decode()))
            at += size
        keys.flush()
        del keys
        os.replace(tmp / "keys.npy", tmp / KEYS)  # .npy header kept: np.load(..., mmap_mode="r") reads it
        np.save(tmp / "values.npy", values)
        np.save(tmp / "doc.npy", doc)
        np.save(tmp / "offset.npy", offset)
        write_bytes_atomic(tmp / "docs.jsonl", "".join(json.dumps(d) + "\n" for d in docs).encode())
        xb_all = np.load(tmp / KEYS, mmap_mode="r")
        factory = auto_factory(n, dim) if config.factory == "auto" else config.factory
        index = _new_index(factory, dim)
        if not index.is_trained:
            rng = np.random.default_rng(config.seed)
            ivf = _ivf_of(index)  # PQ / SQ without IVF train too, with no lists
            nlist = ivf.nlist if ivf is not None else 1
            want = max(config.train_size, 39 * nlist)  # faiss's k-means wants >= 39 points per centroid
            sample = np.sort(rng.choice(n, size=min(n, want), replace=False))
            if len(sample) < nlist:
                raise ConfigError(f"index {factory!r} needs at least {nlist} training vectors; the datastore "
                                  f"has {n}: use a smaller IVF (e.g. IVF{max(1, n // 39)},PQ..) or Flat")
            try:
                index.train(np.ascontiguousarray(xb_all[sample], dtype=np.float32))
            except RuntimeError as e:
                raise ConfigError(f"index {factory!r} cannot be trained on the datastore's {n} vectors "
                                  f"({_faiss_reason(e)}): use a smaller index (fewer PQ bits, fewer lists) or "
                                  "Flat") from None
        for start in tqdm(range(0, n, config.add_batch), desc="index", disable=not progress):
            xb = np.ascontiguousarray(xb_all[start:start + config.add_batch], dtype=np.float32)
            index.add_with_ids(xb, np.arange(start, start + len(xb), dtype=np.int64))
        del xb_all
        tombstones = carried_tombstones(out, KIND, hold)
        dead = np.flatnonzero(match_documents([DocInfo(**d) for d in docs], tombstones["doc_ids"],
                                              tombstones["sources"], tombstones["license_classes"])[doc])
        if len(dead):
            index.remove_ids(dead.astype(np.int64))
        faiss.write_index(index, str(tmp / INDEX))
        write_manifest(tmp, {
            "kind": KIND, "format_version": FORMAT_VERSION, **info, "factory": factory,
            "nprobe": config.nprobe, "metric": "L2", "entries": n, "documents": len(docs),
            "tombstones": tombstones, "removed_entries": len(dead),
            "index_bytes": (tmp / INDEX).stat().st_size,
        })
    return Datastore.load(out)


def build_datastore(docs: Iterable, loaded, out: str | os.PathLike, config: DatastoreConfig = DatastoreConfig(),
                    *, shard: tuple[int, int] | None = None, progress: bool = True):
    """Build a datastore at ``out`` from ``docs`` with ``loaded`` (an :class:`lmlab.lm.models.LoadedModel`).

    Without ``shard``: parts go to ``out.parts/`` (kept for resume until the datastore is complete) and the
    datastore to ``out``; returns the :class:`Datastore`. With ``shard=(i, n)``: ``out`` is a shard folder
    of parts (returns the build info); join the shards with :func:`merge_shards`.
    """
    out = _abs(out)
    if shard is not None:
        return encode_parts(docs, loaded, out, config, shard=shard, progress=progress)
    existing_artefact(out, KIND)  # refuse before encoding anything
    parts = out.with_name(out.name + ".parts")
    encode_parts(docs, loaded, parts, config, progress=progress)
    ds = finalize([parts], out, config, progress=progress)
    shutil.rmtree(parts, ignore_errors=True)
    return ds


def merge_shards(shards: list[str | os.PathLike], out: str | os.PathLike,
                 config: DatastoreConfig = DatastoreConfig(), *, progress: bool = True) -> Datastore:
    """Join shard folders written by ``build_datastore(..., shard=(i, n))`` into one datastore at ``out``."""
    return finalize(list(shards), out, config, progress=progress)


# -- loading, searching, opting out -----------------------------------------------------------------


class Datastore:
    """A built datastore folder: search it, look up provenance, opt documents out.

    ``D, I = ds.search(xq, k)`` returns squared L2 distances and entry ids; entries of opted-out documents
    never appear (they are removed from the index and masked).
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self._seen = None  # the manifest file this object last read (refresh)
        self._load()

    def _load(self) -> None:
        """Read the folder's files; a missing, truncated or garbage one is a DataError, not a traceback."""
        import faiss

        folder, manifest = self.folder, self.manifest
        check_sizes(folder, manifest, skip_size=(INDEX,))  # opt-out rewrites the index (a crash may leave the old)
        with _readable(folder, "values.npy"):
            self.values = np.load(folder / "values.npy")  # (N,) int32 next-token ids
        with _readable(folder, "doc.npy"):
            self.doc = np.load(folder / "doc.npy")  # (N,) int32 document index
        with _readable(folder, "offset.npy"):
            self.offset = np.load(folder / "offset.npy")  # (N,) int32 token offset in the document
        with _readable(folder, KEYS):
            self.keys = np.load(folder / KEYS, mmap_mode="r")  # (N, D) float16
        with _readable(folder, "docs.jsonl"), open(folder / "docs.jsonl", encoding="utf-8") as f:
            self.docs = [DocInfo(**json.loads(line)) for line in f]
        with _readable(folder, INDEX):
            self.index = faiss.read_index(str(folder / INDEX))
        n = len(self.values)
        if (len(self.doc), len(self.offset), self.keys.shape) != (n, n, (n, int(manifest["dim"]))) \
                or n != manifest.get("entries", n) or (n and int(self.doc.max()) >= len(self.docs)) \
                or self.index.ntotal > n or self.index.d != self.keys.shape[1]:
            raise DataError(f"{folder} is incomplete or corrupted (its files disagree on the number of entries): "
                            "rebuild it")
        self.nprobe = int(manifest.get("nprobe", 8))
        self._ivf = _ivf_of(self.index)
        if self._ivf is not None:
            self._ivf.nprobe = self.nprobe
        self.removed_docs = np.zeros(len(self.docs), bool)
        self._apply_tombstones()

    # identity
    @classmethod
    def load(cls, folder: str | os.PathLike, loaded=None, *, key_point: str | None = None,
             verify: bool = False) -> Datastore:
        """Open a datastore; with ``loaded`` (a LoadedModel) refuse one built with another model or tokenizer."""
        folder = _abs(folder)
        _finish_interrupted_optout(folder)
        manifest = read_manifest(folder, verify=verify)
        if manifest.get("kind") != KIND:
            raise ManifestMismatchError(f"{folder} is a {manifest.get('kind')!r}, not a {KIND}")
        if "dim" not in manifest:
            raise DataError(f"{folder}/{MANIFEST} lacks the datastore's fields: the folder is corrupted, rebuild it")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatchError(f"{folder} has datastore format {manifest.get('format_version')}; "
                                        f"this lmlab reads {FORMAT_VERSION}: rebuild it")
        if loaded is not None:
            check_compatible(manifest, loaded, key_point=key_point, where=str(folder))
        return cls(folder, manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def key_point(self) -> str:
        return str(self.manifest["key_point"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def n_entries(self) -> int:
        return len(self.values)

    # search
    def search(self, xq: np.ndarray, k: int, *, rescore: bool = False) -> SearchResult:
        """The ``k`` nearest live entries of each query (n, D); ``rescore``: exact distances from the fp16 keys."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise DataError(f"queries must be (n, {self.dim}); got {xq.shape}")
        k_eff = max(1, min(k, len(self)))
        D, I = self.index.search(xq, k_eff, params=self._search_params(k_eff))  # noqa: E741
        D = D.astype(np.float32)
        valid = I >= 0
        if valid.any() and self.removed_docs.any():  # opted-out entries are removed from the index too: belt
            dead = np.zeros_like(valid)
            dead[valid] = self.removed_docs[self.doc[I[valid]]]
            valid &= ~dead
        I = np.where(valid, I, -1)  # noqa: E741
        D = np.where(valid, D, np.inf).astype(np.float32)
        if rescore:
            D = self.exact_distances(xq, I)
        if k_eff < k:  # pad to the asked width
            pad = k - k_eff
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=np.inf)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)  # noqa: E741
        return SearchResult(D=D, I=I)

    def probes_for(self, k: int) -> int:
        """IVF lists to probe for ``k`` neighbours: the manifest's nprobe, raised until the probed lists hold
        about 2k vectors on average (with nprobe 8 over small lists, k = 4096 would otherwise return fewer
        than k candidates, silently shrinking k)."""
        if self._ivf is None:
            return 0
        per_list = max(1.0, self.index.ntotal / self._ivf.nlist)
        return int(min(self._ivf.nlist, max(self.nprobe, math.ceil(2 * k / per_list))))

    def _search_params(self, k: int):
        """Per-call faiss parameters (thread-safe, unlike setting ``index.nprobe``: the server searches
        from several threads)."""
        if self._ivf is None:
            return None
        import faiss

        return faiss.SearchParametersIVF(nprobe=self.probes_for(k))

    def exact_distances(self, xq: np.ndarray, I: np.ndarray, *, block: int = 16) -> np.ndarray:  # noqa: E741
        """Squared L2 between each query and its neighbours' fp16 keys (silo-lm ``get_knn_scores``), by blocks."""
        out = np.full(I.shape, np.inf, np.float32)
        for s in range(0, len(I), block):
            ii = I[s:s + block]
            ok = ii >= 0
            uniq = np.unique(ii[ok])  # sorted: one pass over the memmap
            kb = np.zeros((*ii.shape, self.dim), np.float32)  # (b, K, D)
            kb[ok] = np.asarray(self.keys[uniq], dtype=np.float32)[np.searchsorted(uniq, ii[ok])]
            d = ((xq[s:s + block, None, :] - kb) ** 2).sum(-1)
            out[s:s + block] = np.where(ok, d, np.inf)
        return out

    # provenance
    def entry_doc(self, entry: int) -> DocInfo:
        return self.docs[int(self.doc[entry])]

    def snippet(self, entry: int, tokenizer, *, before: int = 24, after: int = 8) -> str:
        """Text around an entry: its document's tokens up to ``after`` past the value token (values are the stream)."""
        entry = int(entry)
        d = self.doc[entry]
        lo, hi = max(0, entry - before), min(self.n_entries, entry + after + 1)
        span = np.arange(lo, hi)
        span = span[self.doc[span] == d]
        return tokenizer.decode(self.values[span].tolist())

    # opt-out
    def _match(self, doc_ids: Iterable[str] = (), sources: Iterable[str] = (),
               license_classes: Iterable[str] = ()) -> np.ndarray:
        return match_documents(self.docs, doc_ids, sources, license_classes)

    def _apply_tombstones(self) -> int:
        t = self.manifest.get("tombstones", {})
        self.removed_docs = self._match(t.get("doc_ids", ()), t.get("sources", ()), t.get("license_classes", ()))
        dead = np.flatnonzero(self.removed_docs[self.doc])
        if not len(dead):
            return 0
        try:
            return int(self.index.remove_ids(dead.astype(np.int64)))
        except RuntimeError:  # HNSW (refused by builds since; an older datastore may have one)
            raise ConfigError(f"{self.folder}: its index ({self.manifest.get('factory')!r}) cannot remove entries, "
                              "so documents cannot be opted out: rebuild it with Flat or an IVF index") from None

    def refresh(self) -> bool:
        """Catch up with what another process wrote (``lmlab silo optout`` beside a server; a rebuild): if the
        manifest changed, apply its tombstones, or reload the folder if it was rebuilt. Returns whether it changed.
        A rebuild with another model raises ManifestMismatchError (the model in memory would not match)."""
        stamp = manifest_stamp(self.folder)  # before reading: a write after it is seen next time
        if stamp is None or stamp == self._seen:
            return False
        manifest = read_manifest(self.folder)
        if manifest.get("kind") != KIND:
            raise DataError(f"{self.folder} is no longer a {KIND}: restart with a datastore")
        if _build_identity(manifest) != _build_identity(self.manifest):
            for key in ("model_fingerprint", "tokenizer_fingerprint", "key_point"):
                if manifest.get(key) != self.manifest.get(key):
                    raise ManifestMismatchError(f"{self.folder} was rebuilt with another {key.split('_')[0]}: "
                                                "restart with the model it was built with")
            self._replace_with({**manifest, "tombstones": merge_tombstones(self.manifest.get("tombstones", {}),
                                                                           manifest.get("tombstones", {}))})
        else:
            tombstones = merge_tombstones(self.manifest.get("tombstones", {}), manifest.get("tombstones", {}))
            changed = tombstones != merge_tombstones(self.manifest.get("tombstones", {}))
            old, self.manifest = self.manifest, {**manifest, "tombstones": tombstones}
            if changed:
                try:
                    self._apply_tombstones()
                except BaseException:  # interrupted: the next refresh must still see them as new and apply them
                    self.manifest = old
                    raise
        self._seen = stamp
        return True

    def _replace_with(self, manifest: dict) -> None:
        """Load the folder with ``manifest`` into a new object, then take its state: a read that fails or is
        interrupted half-way leaves this object as it was (not new values over an old index)."""
        self.__dict__.update(Datastore(self.folder, manifest).__dict__)

    def optout(self, *, doc_ids: Iterable[str] = (), sources: Iterable[str] = (),
               license_classes: Iterable[str] = ()) -> OptOutReport:
        """Remove documents by id, source/group (``prefix*`` for a prefix) or licence class; persist atomically.

        Under the folder's opt-out lock, starting from the manifest on disk: an opt-out another process made since
        this datastore was loaded is kept (and applied here too), not overwritten.
        """
        import faiss

        doc_ids, sources, license_classes = check_optout_request(doc_ids, sources, license_classes)
        with folder_lock(self.folder):
            self.refresh()
            hit = self._match(doc_ids, sources, license_classes)
            if not hit.any():
                raise DataError("no datastore document matches that opt-out request (check the id/source/class)")
            newly = hit & ~self.removed_docs
            before = len(self)
            t = merge_tombstones(self.manifest.get("tombstones", {}),
                                 {"doc_ids": doc_ids, "sources": sources, "license_classes": license_classes})
            tmp, written = _optout_tmp(self.folder), False
            try:
                self.manifest = {**self.manifest, "tombstones": t}
                self._apply_tombstones()
                removed = before - len(self)
                # The manifest (tombstones + the new index's checksum) is written first: a crash before the index
                # is renamed into place leaves the old index, and loading re-applies the tombstones to it.
                faiss.write_index(self.index, str(tmp))
                files = dict(self.manifest.get("files", {}))
                files[INDEX] = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
                self.manifest = {**self.manifest, "removed_entries": int(self.n_entries - len(self)),
                                 "index_bytes": tmp.stat().st_size, "files": files}
                write_json_atomic(self.folder / MANIFEST, self.manifest)
                written = True
                self._seen = manifest_stamp(self.folder)
                os.replace(tmp, self.folder / INDEX)
            except BaseException:
                # failed or interrupted part-way: this object goes back to what the folder holds (it must not
                # report as removed what a restart would bring back; a retry then reports what it removes). Once
                # the manifest records the new index, the index is put in place too (else --verify would fail).
                with contextlib.suppress(OSError):
                    if written:
                        os.replace(tmp, self.folder / INDEX)
                    else:
                        tmp.unlink(missing_ok=True)
                self._replace_with(read_manifest(self.folder))
                raise
        return OptOutReport(documents=int(newly.sum()), entries=int(removed), live_entries=len(self), tombstones=t)

    def stats(self) -> dict:
        live_docs = int((~self.removed_docs).sum())
        m = self.manifest
        return dict(folder=str(self.folder), model=m["model"], key_point=m["key_point"], dim=m["dim"],
                    factory=m["factory"], entries=self.n_entries, live_entries=len(self), documents=len(self.docs),
                    live_documents=live_docs, tombstones=m.get("tombstones", {}),
                    index_bytes=int((self.folder / INDEX).stat().st_size),
                    index_bytes_per_entry=(self.folder / INDEX).stat().st_size / max(1, self.n_entries))


def _optout_tmp(folder: Path) -> Path:
    """Where an opt-out writes the new index before renaming it over ``index.faiss``."""
    return folder / f".{INDEX}.tmp"


def _finish_interrupted_optout(folder: Path) -> None:
    """Repair what a killed opt-out left (SIGKILL or power loss; an exception or Ctrl-C repairs itself).

    Killed after the manifest was written but before the index was renamed, the new index lies complete beside
    the old one: it is renamed into place, since the manifest already lists it (loading the old index would still
    re-apply the tombstones, but the manifest's checksum would not match it). Killed before the manifest was
    written, the file is stale and removed. Under the opt-out lock, and only when such a file exists; on a
    read-only folder nothing is repaired (the tombstones still apply).
    """
    tmp = _optout_tmp(folder)
    if not tmp.is_file():
        return
    try:
        with folder_lock(folder):
            if not tmp.is_file():  # an opt-out in progress finished while we waited for its lock
                return
            entry = read_manifest(folder).get("files", {}).get(INDEX, {})
            if tmp.stat().st_size == entry.get("bytes") and sha256_file(tmp) == entry.get("sha256"):
                os.replace(tmp, folder / INDEX)
            else:
                tmp.unlink()
    except OSError as e:
        log.warning("%s: could not finish an interrupted opt-out (%s); its tombstones still apply", folder, e)


def manifest_stamp(folder: Path):
    """Identity of the manifest file now (a new inode for every atomic write); None while it is being replaced."""
    try:
        st = os.stat(folder / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _build_identity(manifest: dict) -> str:
    """What a rebuild changes and an opt-out does not: the manifest without tombstones and the index file."""
    skip = ("tombstones", "removed_entries", "index_bytes", "files")
    files = {k: v for k, v in manifest.get("files", {}).items() if k != INDEX}
    return json.dumps([{k: v for k, v in manifest.items() if k not in skip}, files], sort_keys=True, default=str)


@contextlib.contextmanager
def _readable(folder: Path, name: str):
    """Turn a failure to read ``name`` (garbage, truncated, unreadable) into one actionable DataError."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise DataError(f"{folder} is incomplete or corrupted ({name} cannot be read): rebuild it") from e


def check_optout_request(doc_ids: Iterable[str], sources: Iterable[str],
                         license_classes: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """The request as lists, or ConfigError: it names nothing, an unknown licence class, or a source pattern that
    matches every document.

    Opt-outs are permanent, so a bare ``*`` (or an empty pattern) is refused rather than read as "remove
    everything"; opting out all of a datastore is a licence class at a time, or a rebuild without it."""
    from lmlab.corpus import LicenseClass

    doc_ids, sources, license_classes = list(doc_ids), list(sources), list(license_classes)
    if not (doc_ids or sources or license_classes):
        raise ConfigError("opt-out needs at least one document id, source or licence class")
    for c in license_classes:
        if c not in set(LicenseClass):  # a typo would be kept as a tombstone that removes nothing
            raise ConfigError(f"unknown licence class {c!r}: choose from {', '.join(LicenseClass)}")
    if any(s.rstrip("*") == "" for s in sources):
        raise ConfigError("an opt-out source of '*' or '' would match every document; name sources, groups or "
                          "source prefixes (e.g. 'debian:gpl-*'), or licence classes")
    return doc_ids, sources, license_classes


def match_documents(docs: list[DocInfo], doc_ids: Iterable[str] = (), sources: Iterable[str] = (),
                    license_classes: Iterable[str] = ()) -> np.ndarray:
    """(n_docs,) bool: documents whose id is in ``doc_ids``, whose source or group is in ``sources`` (an entry
    ending in ``*`` is a source prefix), or whose licence class is in ``license_classes``."""
    ids, srcs, classes = set(doc_ids), list(sources), set(license_classes)
    exact = {s for s in srcs if not s.endswith("*")}
    prefixes = tuple(s[:-1] for s in srcs if s.endswith("*"))
    return np.array([d.id in ids or d.source in exact or d.group in exact
                     or (bool(prefixes) and d.source.startswith(prefixes)) or d.license_class in classes
                     for d in docs], dtype=bool)


def check_compatible(manifest: dict, loaded, *, key_point: str | None = None, where: str = "datastore") -> None:
    """Raise ManifestMismatchError unless ``loaded``'s weights and tokenizer are those the datastore was built with."""
    fp = model_fingerprint(loaded.model)
    if manifest.get("model_fingerprint") != fp:
        raise ManifestMismatchError(f"{where} was built with model {manifest.get('model')!r} (fingerprint "
                                    f"{manifest.get('model_fingerprint')}), not with {loaded.spec!r} ({fp}): "
                                    "use that model or rebuild the datastore")
    tfp = tokenizer_fingerprint(loaded.tokenizer)
    if manifest.get("tokenizer_fingerprint") != tfp:
        raise ManifestMismatchError(f"{where} was built with another tokenizer ({manifest.get('tokenizer_fingerprint')}"
                                    f" != {tfp}): use the model's own tokenizer or rebuild the datastore")
    if key_point is not None and key_point != manifest.get("key_point"):
        raise ManifestMismatchError(f"{where} keys are at {manifest.get('key_point')!r}, not {key_point!r}")
