"""The corpus store: a folder of Parquet shards of Documents plus ``manifest.json``.

Layout::

    corpus/
      manifest.json            schema version, counts and bytes per licence class / source / group,
                               per-source status and skip counts, shard checksums, the build commands
      shards/shard-00000.parquet   columns: id, text, source, license, license_class, group, origin,
                                   meta (JSON), text_hash

- :class:`CorpusWriter` appends atomically: documents are buffered, each shard is written under a
  temporary name, fsynced and renamed into place, and only then is it listed in the manifest (itself
  written atomically). A shard file the manifest does not list is what an interrupt left; it is deleted
  when the store is next opened, so readers see either the old corpus or the new one.
- Resume: each ``--from`` source is marked ``partial`` while it runs and ``complete`` when its last
  shard is durable. A rebuild skips complete sources; a partial one is harvested again and the
  documents already stored (same id) are passed over, so nothing is lost or written twice.
- Exact duplicates (the same :func:`~lmlab.corpus.document.text_hash`) are dropped and counted per
  source; so are empty documents and those over the per-group byte cap.
- :class:`Corpus` reads a store (filtering by licence class, source or group with Parquet predicates);
  :func:`open_corpus` also accepts a user's plain folder of text files or JSONL.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from lmlab.corpus.document import Document, document_id, text_hash
from lmlab.corpus.licenses import UNKNOWN, License, LicenseClass, classify
from lmlab.errors import ConfigError, DataError, ManifestMismatchError, MissingDependencyError
from lmlab.io import MANIFEST, check_sizes, ctrl_c_held, read_manifest, sha256_file, write_json_atomic

log = logging.getLogger("lmlab.corpus")

KIND = "corpus"
SCHEMA_VERSION = 1
SHARD_DIR = "shards"
COLUMNS = ("id", "text", "source", "license", "license_class", "group", "origin", "meta", "text_hash")
_SHARD_NAME = re.compile(r"^shard-(\d{5,})\.parquet$")


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("pyarrow (the corpus store)", "pip install 'lmlab[corpus]'") from None
    return pa, pq


def schema():
    pa, _ = _pa()
    return pa.schema([(c, pa.string()) for c in COLUMNS])


@dataclass(frozen=True)
class StoreConfig:
    shard_mb: float = 64.0  # text per shard; a shard is also the unit an interrupt can lose
    min_chars: int = 16  # shorter documents (after stripping) are dropped as empty
    max_mb_per_group: float | None = None  # cap per group (Debian source package, PyPI project...); None: no cap
    compression: str = "zstd"


class AddStatus(StrEnum):
    ADDED = "added"
    PRESENT = "present"  # stored by an earlier, interrupted run of the same source
    DUPLICATE = "duplicate"
    EMPTY = "empty"
    OVER_CAP = "over_cap"


def _counts() -> dict[str, int]:
    return {"documents": 0, "bytes": 0}


@dataclass
class SourceState:
    """What the manifest records for one ``--from`` source."""

    status: str = "partial"
    documents: int = 0
    bytes: int = 0
    duplicates: int = 0
    empty: int = 0
    over_cap: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)


def _cap(mb: float | None) -> str:
    return "0 (no cap)" if mb is None else f"{mb:g}"


class CorpusWriter:
    """Append Documents to a corpus folder (created if missing); use as a context manager."""

    def __init__(self, folder: str | os.PathLike, *, config: StoreConfig = StoreConfig(), command: str = ""):
        self.folder = Path(folder)
        self.config = config
        self.command = command
        self._buffer: list[tuple[Document, str]] = []
        self._buffer_bytes = 0
        self._open()

    # -- state -----------------------------------------------------------------------------------
    def _open(self) -> None:
        path = self.folder / MANIFEST
        if path.is_file():
            m = read_manifest(self.folder)
            if _kind(m) != KIND:
                raise ManifestMismatchError(f"{self.folder} holds a {_kind(m)!r}, not a corpus: choose another --out")
            if m.get("schema_version") != SCHEMA_VERSION:
                raise ManifestMismatchError(
                    f"{self.folder} has corpus schema {m.get('schema_version')}, this lmlab writes {SCHEMA_VERSION}: "
                    "build into a new folder")
            _check_manifest(self.folder, m)
            cap = m.get("config", {}).get("max_mb_per_group", self.config.max_mb_per_group)
            if cap != self.config.max_mb_per_group:  # its complete sources would be skipped, not capped anew
                raise ConfigError(f"{self.folder} was built with --max-mb-per-source {_cap(cap)}, not "
                                  f"{_cap(self.config.max_mb_per_group)}: use the same cap to resume or extend it, or "
                                  "build into another --out")
        else:
            if self.folder.exists() and any(p.name != SHARD_DIR for p in self.folder.iterdir()):
                raise DataError(f"{self.folder} exists and is not a corpus (no {MANIFEST}): choose another --out")
            m = {}
        self.manifest: dict[str, Any] = {
            "kind": KIND, "schema_version": SCHEMA_VERSION, "documents": 0, "bytes": 0, "duplicates": 0,
            "per_license_class": {}, "per_source": {}, "per_group": {}, "sources": {}, "shards": [], "files": {},
            "commands": [], **m,
        }
        if self.command and self.command not in self.manifest["commands"]:
            self.manifest["commands"].append(self.command)
        self.manifest["config"] = dataclasses.asdict(self.config)
        self.sources = {k: SourceState(**v) for k, v in self.manifest["sources"].items()}
        listed = {s["path"] for s in self.manifest["shards"]}
        shard_dir = self.folder / SHARD_DIR
        shard_dir.mkdir(parents=True, exist_ok=True)
        for p in shard_dir.iterdir():  # what an interrupt left between a shard's rename and the manifest
            if f"{SHARD_DIR}/{p.name}" not in listed:
                log.warning("removing %s: written by an interrupted build and never listed in the manifest", p)
                p.unlink()
        self._next_shard = 1 + max((int(_SHARD_NAME.match(Path(s).name)[1]) for s in listed), default=-1)
        self.ids: set[str] = set()
        self.hashes: set[str] = set()
        _, pq = _pa()
        for rel in sorted(listed):
            table = _read_shard(self.folder, rel, pq, columns=["id", "text_hash"])
            self.ids.update(table.column("id").to_pylist())
            self.hashes.update(table.column("text_hash").to_pylist())

    def source(self, origin: str) -> SourceState:
        return self.sources.setdefault(origin, SourceState())

    def is_complete(self, origin: str) -> bool:
        return origin in self.sources and self.sources[origin].status == "complete"

    def start_source(self, origin: str) -> None:
        """Begin (or resume) harvesting ``origin``: its drop and skip counts restart from zero."""
        kept = self.source(origin)
        self.sources[origin] = SourceState(documents=kept.documents, bytes=kept.bytes)

    def set_skips(self, origin: str, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        """Record ``origin``'s bad inputs (unreadable, binary, malformed licence file...): counts and example paths."""
        state = self.source(origin)
        state.skipped = dict(sorted(counts.items()))
        state.examples = {k: list(v) for k, v in sorted(examples.items())}

    def finish_source(self, origin: str, *, complete: bool = True) -> None:
        """Make ``origin``'s documents durable and mark it complete (a rebuild will skip it); with
        ``complete=False`` it stays partial, so a rebuild harvests it again (passing over what is stored)."""
        self.flush()
        if complete:
            self.source(origin).status = "complete"
        self._write_manifest()

    # -- writing ---------------------------------------------------------------------------------
    def add(self, doc: Document) -> AddStatus:
        """Buffer one document unless it is stored already, a duplicate, empty, or over its group's cap."""
        state = self.source(doc.origin)
        if doc.id in self.ids:
            return AddStatus.PRESENT
        if len(doc.text.strip()) < self.config.min_chars:
            state.empty += 1
            return AddStatus.EMPTY
        h = text_hash(doc.text)
        if h in self.hashes:
            state.duplicates += 1
            return AddStatus.DUPLICATE
        n = doc.n_bytes
        cap = self.config.max_mb_per_group
        if cap is not None and self.manifest["per_group"].get(doc.group, {}).get("bytes", 0) + n > cap * 1e6:
            state.over_cap += 1
            return AddStatus.OVER_CAP
        with ctrl_c_held():  # the document and its counts land together (a close after Ctrl-C commits both)
            self.ids.add(doc.id)
            self.hashes.add(h)
            for table, key in ((self.manifest["per_license_class"], doc.license_class),
                               (self.manifest["per_source"], doc.origin), (self.manifest["per_group"], doc.group)):
                row = table.setdefault(key, _counts())
                row["documents"] += 1
                row["bytes"] += n
            self.manifest["documents"] += 1
            self.manifest["bytes"] += n
            state.documents += 1
            state.bytes += n
            self._buffer.append((doc, h))
            self._buffer_bytes += n
        if self._buffer_bytes >= self.config.shard_mb * 1e6:
            self.flush()
        return AddStatus.ADDED

    def flush(self) -> None:
        """Write the buffered documents as one shard (temp name, fsync, rename), then the manifest."""
        if not self._buffer:
            return
        pa, pq = _pa()
        cols: dict[str, list[str]] = {c: [] for c in COLUMNS}
        for doc, h in self._buffer:
            for c, v in zip(COLUMNS, (doc.id, doc.text, doc.source, doc.license, doc.license_class, doc.group,
                                      doc.origin, json.dumps(doc.meta, sort_keys=True, default=str), h), strict=True):
                cols[c].append(v)
        table = pa.Table.from_pydict(cols, schema=schema())
        rel = f"{SHARD_DIR}/shard-{self._next_shard:05d}.parquet"
        final = self.folder / rel
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression=self.config.compression)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        # the shard, its listing and the emptied buffer land together (else a close after Ctrl-C wrote the same
        # documents again as the next shard)
        with ctrl_c_held():
            os.replace(tmp, final)
            self._next_shard += 1
            self.manifest["shards"].append({"path": rel, "documents": len(self._buffer), "bytes": self._buffer_bytes})
            self.manifest["files"][rel] = {"bytes": final.stat().st_size, "sha256": digest}
            self._buffer, self._buffer_bytes = [], 0
            self._write_manifest()

    def _write_manifest(self) -> None:
        from lmlab import __version__

        self.manifest["lmlab_version"] = __version__
        self.manifest["sources"] = {k: dataclasses.asdict(v) for k, v in sorted(self.sources.items())}
        self.manifest["duplicates"] = sum(s.duplicates for s in self.sources.values())
        write_json_atomic(self.folder / MANIFEST, self.manifest)

    def close(self) -> None:
        self.flush()
        self._write_manifest()

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Buffered documents are whole and valid even when harvesting failed or was interrupted:
        # commit them, so the resumed build need not redo them (their source stays "partial").
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # the buffer may be what failed: let the original error through, not this one
            log.warning("could not commit the buffered documents after %s: %s", exc_type.__name__, e)


# -- reading --------------------------------------------------------------------------------------
def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass(frozen=True)
class Selection:
    """Which documents a corpus view yields: None means no restriction on that field."""

    license_classes: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None  # the ``--from`` specs (origins)
    groups: tuple[str, ...] | None = None

    def matches(self, doc: Document) -> bool:
        return ((self.license_classes is None or doc.license_class in self.license_classes)
                and (self.sources is None or doc.origin in self.sources)
                and (self.groups is None or doc.group in self.groups))


class BaseCorpus:
    """What every corpus offers: iterate Documents (optionally filtered) and their texts."""

    selection = Selection()

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Document]:
        return self.documents()

    def texts(self) -> Iterator[str]:
        return (d.text for d in self.documents())

    def filter(self, *, license_classes: str | Iterable[str] | None = None, sources: str | Iterable[str] | None = None,
               groups: str | Iterable[str] | None = None):
        """A view of this corpus restricted to some licence classes, sources (``--from`` specs) or groups."""
        classes = _as_list(license_classes)
        for c in classes or ():
            if c not in set(LicenseClass):
                raise DataError(f"unknown licence class {c!r}: choose from {', '.join(LicenseClass)}")
        sel = Selection(
            license_classes=tuple(classes) if classes is not None else self.selection.license_classes,
            sources=tuple(_as_list(sources)) if sources is not None else self.selection.sources,
            groups=tuple(_as_list(groups)) if groups is not None else self.selection.groups,
        )
        return self._with_selection(sel)

    def permissive(self, *, attribution: bool = True):
        """SILO's training pool: public domain + permissive software (+ attribution licences)."""
        classes = [LicenseClass.PUBLIC_DOMAIN, LicenseClass.PERMISSIVE_SW]
        return self.filter(license_classes=classes + ([LicenseClass.ATTRIBUTION] if attribution else []))

    def _with_selection(self, selection: Selection):
        raise NotImplementedError


class Corpus(BaseCorpus):
    """A corpus folder written by :class:`CorpusWriter` (see the module docstring for the layout)."""

    def __init__(self, folder: str | os.PathLike, *, verify: bool = False, selection: Selection = Selection()):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        if _kind(self.manifest) != KIND:
            raise ManifestMismatchError(f"{self.folder} is a {_kind(self.manifest)!r}, not a corpus")
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise ManifestMismatchError(f"{self.folder} has corpus schema {self.manifest.get('schema_version')}; "
                                        f"this lmlab reads {SCHEMA_VERSION}: rebuild it with `lmlab corpus build`")
        _check_manifest(self.folder, self.manifest)
        self.selection = selection
        self.shards = [self.folder / s["path"] for s in self.manifest["shards"]]

    def _with_selection(self, selection: Selection) -> Corpus:
        view = copy.copy(self)
        view.selection = selection
        return view

    def _filter_expression(self):
        import pyarrow.compute as pc

        expr = None
        for column, values in (("license_class", self.selection.license_classes), ("origin", self.selection.sources),
                               ("group", self.selection.groups)):
            if values is not None:
                term = pc.field(column).isin(list(values))
                expr = term if expr is None else expr & term
        return expr

    def batches(self, columns: Iterable[str] = COLUMNS, *, batch_size: int = 1024):
        """Arrow record batches of the selected rows (only ``columns``): the fast path for bulk readers."""
        _pa()
        import pyarrow.dataset as ds

        if not self.shards:
            return
        pa, _ = _pa()
        try:
            dataset = ds.dataset([str(s) for s in self.shards], format="parquet", schema=schema())
            yield from dataset.to_batches(columns=list(columns), filter=self._filter_expression(),
                                          batch_size=batch_size)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.folder}: a shard cannot be read ({str(e).splitlines()[0]}): the corpus is "
                            "corrupted; rebuild it with `lmlab corpus build`") from None

    def documents(self) -> Iterator[Document]:
        for batch in self.batches():
            for row in batch.to_pylist():
                yield _row_to_document(row)

    def texts(self) -> Iterator[str]:
        for batch in self.batches(["text"]):
            yield from batch.column("text").to_pylist()

    def __len__(self) -> int:
        if self.selection == Selection():
            return int(self.manifest["documents"])
        return sum(b.num_rows for b in self.batches(["id"]))

    def get(self, doc_id: str) -> Document:
        """The document with this id, or with this unique id prefix (at least 6 hex digits)."""
        import pyarrow.compute as pc

        if len(doc_id) < 6:
            raise DataError("give at least 6 characters of the document id")
        hits: list[str] = []
        for batch in self.batches(["id"]):
            ids = batch.column("id")
            hits += pc.filter(ids, pc.starts_with(ids, doc_id)).to_pylist()
        if not hits:
            raise DataError(f"no document with id {doc_id!r} in {self.folder}")
        if len(hits) > 1:
            raise DataError(f"{len(hits)} documents start with {doc_id!r}: give more of the id")
        for batch in self.batches():
            match = batch.filter(pc.equal(batch.column("id"), hits[0]))
            if match.num_rows:
                return _row_to_document(match.to_pylist()[0])
        raise DataError(f"no document with id {doc_id!r} in {self.folder}")  # unreachable: hits[0] was found


def _kind(manifest) -> str | None:
    """A manifest's ``kind`` (None when the JSON is not even an object)."""
    return manifest.get("kind") if isinstance(manifest, dict) else None


def _check_manifest(folder: Path, m: dict[str, Any]) -> None:
    """The keys a corpus manifest must have, and every listed shard present at its recorded size.

    The size check is one ``stat`` per shard: it catches a shard truncated by a crash or a copy that did not
    finish (``verify=True`` also compares checksums).
    """
    need = {"documents": int, "shards": list, "files": dict, "per_license_class": dict, "per_source": dict}
    for key, kind in need.items():
        if not isinstance(m.get(key), kind):
            raise ManifestMismatchError(f"{folder / MANIFEST} lacks a valid {key!r} (written by lmlab "
                                        f"{m.get('lmlab_version', '?')}?): rebuild it with `lmlab corpus build`")
    for s in m["shards"]:
        rel = s.get("path") if isinstance(s, dict) else None
        if not isinstance(rel, str) or not _SHARD_NAME.match(Path(rel).name):
            raise ManifestMismatchError(f"{folder / MANIFEST} lists a malformed shard entry {s!r}: rebuild the corpus")
    check_sizes(folder, m, only=[s["path"] for s in m["shards"]], hint="rebuild it with `lmlab corpus build`")


def _read_shard(folder: Path, rel: str, pq, *, columns: list[str]):
    pa, _ = _pa()
    try:
        return pq.read_table(folder / rel, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{folder / rel} cannot be read ({str(e).splitlines()[0]}): the corpus is corrupted; "
                        "delete the folder and rebuild it") from None


def _row_to_document(row: dict[str, Any]) -> Document:
    return Document(id=row["id"], text=row["text"], source=row["source"], license=row["license"],
                    license_class=row["license_class"], meta=json.loads(row["meta"]))


class TextCorpus(BaseCorpus):
    """A user's plain folder (or file) of .txt/.md/.rst files and .jsonl, read with ``lmlab.lm.data.read_texts``.

    Every document gets ``license`` (an SPDX expression; ``unknown`` unless given), source ``<path>#<n>``
    and that source as its group.
    """

    def __init__(self, path: str | os.PathLike, *, license: str | None = None, selection: Selection = Selection()):
        self.path = Path(path)
        self.license: License = classify(license) if license else UNKNOWN
        self.selection = selection

    def _with_selection(self, selection: Selection) -> TextCorpus:
        view = copy.copy(self)
        view.selection = selection
        return view

    def documents(self) -> Iterator[Document]:
        from lmlab.lm.data import read_texts

        origin = f"text:{self.path}"
        for i, text in enumerate(read_texts(self.path)):
            source = f"{origin}#{i}"
            doc = Document(id=document_id(source, text), text=text, source=source, license=self.license.expression,
                           license_class=str(self.license.license_class), meta={"group": source, "origin": origin})
            if self.selection.matches(doc):
                yield doc


def open_corpus(path: str | os.PathLike, *, license: str | None = None, verify: bool = False) -> BaseCorpus:
    """Open a corpus folder built by lmlab, or a plain folder/file of text or JSONL (licence ``unknown`` unless given).

    ``license`` (an SPDX expression) applies to plain text only; a built corpus has a licence per document.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if (path / MANIFEST).is_file():
        return Corpus(path, verify=verify)
    return TextCorpus(path, license=license)


def summarize(corpus: BaseCorpus, *, tokenizer=None, batch_docs: int = 256) -> dict[str, dict[str, Counter]]:
    """Documents, bytes (and tokens with a tokenizer) per licence class and per source, computed by reading."""
    out: dict[str, dict[str, Counter]] = {"license_class": {}, "source": {}}
    pending: list[Document] = []

    def count(docs: list[Document]) -> None:
        tokens = [len(ids) for ids in tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]] \
            if tokenizer is not None else [0] * len(docs)
        for doc, n_tok in zip(docs, tokens, strict=True):
            for table, key in ((out["license_class"], doc.license_class), (out["source"], doc.origin)):
                c = table.setdefault(key, Counter())
                c["documents"] += 1
                c["bytes"] += doc.n_bytes
                c["tokens"] += n_tok

    for doc in corpus.documents():
        pending.append(doc)
        if len(pending) >= batch_docs:
            count(pending)
            pending = []
    if pending:
        count(pending)
    return out
