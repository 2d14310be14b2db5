"""Text in, token shards out: what the Trainer reads.

- :func:`read_texts` yields documents from a user's file or folder: ``.txt``/``.md``/``.rst`` files
  (one document each), ``.jsonl`` (one ``{"text": ...}`` per line), recursively.
- :func:`build_token_shards` tokenizes documents, joins them with the EOS token, and writes
  ``train/`` and ``validation/`` folders of ``shard-NNNNN.bin`` (uint16, or uint32 for vocabularies
  over 65,535) with a ``manifest.json`` recording the tokenizer's fingerprint, counts and checksums.
  Documents go to validation by a hash of their text, so the split is stable across rebuilds.
- :class:`TokenShards` memory-maps a folder and samples training windows as a pure function of
  ``(seed, step, micro-batch index)``: a resumed or distributed run sees exactly the batches an
  uninterrupted single-process run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.io import MANIFEST, atomic_dir, check_sizes, read_manifest, write_manifest

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
SPLITS = ("train", "validation")


def read_texts(path: str | os.PathLike, *, min_chars: int = 1) -> Iterator[str]:
    """Yield the documents under ``path`` (a file or a folder; .txt/.md/.rst files and .jsonl)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = False
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{f}:{lineno} is not a JSON object with a \"text\" field") from None
                    _check_text(text, f"{f}:{lineno}")
                    if len(text) >= min_chars:
                        found = True
                        yield text
        elif suffix in TEXT_SUFFIXES or (path.is_file() and f == path):
            text = f.read_text(encoding="utf-8", errors="replace")
            if len(text) >= min_chars:
                found = True
                yield text
    if not found:
        raise DataError(f"no text found under {path} (looked for {', '.join(sorted(TEXT_SUFFIXES))} and .jsonl)")


def _check_text(text, where: str) -> None:
    """A JSONL "text" must be a string the tokenizers can encode: JSON allows null and lone ``\\ud800`` escapes."""
    if not isinstance(text, str):
        raise DataError(f"{where}: \"text\" is {json.dumps(text)[:40]}, not a string; fix or remove that line")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: \"text\" holds a lone surrogate escape (\\ud800-\\udfff), which is not "
                        "valid Unicode; fix or remove that line") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: shards and models must agree on it."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def check_validation_fraction(fraction: float) -> None:
    """The share of documents held out must leave some for training (NaN is refused too)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"the validation fraction must be in [0, 1), not {fraction}")


def _in_validation(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h / 2**64) < fraction


SHARD_RE = re.compile(r"^shard-\d{5}\.bin$")


def _check_replaceable(folder: Path) -> None:
    """:func:`build_token_shards` replaces ``out/train`` and ``out/validation`` whole: only folders of its own
    (shard files and a manifest, from an earlier or an interrupted build) may be replaced, never other files
    (e.g. the text being tokenized, when ``--out`` is the data folder)."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} exists and is not a folder: choose another output folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and not SHARD_RE.match(p.name))
        if foreign:
            raise DataError(f"{folder} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, not "
                            "token shards: writing shards there would delete them; choose another output folder")


def build_token_shards(texts: Iterable[str], tokenizer, out_dir: str | os.PathLike, *,
                       validation_fraction: float = 0.05, shard_tokens: int = 1 << 24,
                       batch_docs: int = 256, source: str = "") -> dict[str, Path]:
    """Tokenize ``texts`` into ``out_dir/train`` and ``out_dir/validation``; returns the two folders.

    Each folder is written under a temporary name and renamed into place when complete.
    """
    check_validation_fraction(validation_fraction)
    out_dir = Path(out_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    for s in SPLITS:  # refuse before tokenizing anything
        _check_replaceable(out_dir / s)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    fp = tokenizer_fingerprint(tokenizer)
    buffers = {s: [] for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    folders = {}
    with atomic_dir(out_dir / "train") as tmp_train, atomic_dir(out_dir / "validation") as tmp_val:
        tmp = {"train": tmp_train, "validation": tmp_val}
        shard_ix = {s: 0 for s in SPLITS}
        pending = {s: 0 for s in SPLITS}

        def flush(split: str, final: bool = False):
            while pending[split] >= shard_tokens or (final and pending[split] > 0):
                arr = np.concatenate(buffers[split]).astype(dtype)
                head, rest = arr[:shard_tokens], arr[shard_tokens:]
                head.tofile(tmp[split] / f"shard-{shard_ix[split]:05d}.bin")
                shard_ix[split] += 1
                buffers[split] = [rest] if len(rest) else []
                pending[split] = len(rest)

        def add(batch: list[str]):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            for text, doc in zip(batch, ids, strict=True):
                split = "validation" if _in_validation(text, validation_fraction) else "train"
                arr = np.asarray(doc + [eos], dtype=np.int64)
                buffers[split].append(arr)
                pending[split] += len(arr)
                counts[split]["documents"] += 1
                counts[split]["tokens"] += len(arr)
            for s in SPLITS:
                flush(s)

        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_docs:
                add(batch)
                batch = []
        if batch:
            add(batch)
        for s in SPLITS:
            flush(s, final=True)
        if counts["train"]["tokens"] == 0:
            raise DataError("no training tokens: the input is empty or all of it went to validation")
        for s in SPLITS:
            write_manifest(tmp[s], {
                "kind": "token_shards", "split": s, "dtype": np.dtype(dtype).name,
                "tokenizer_fingerprint": fp, "vocab_size": len(tokenizer), "eos_token_id": eos,
                "validation_fraction": validation_fraction, "source": source, **counts[s],
            })
            folders[s] = out_dir / s
        # the splits move in one after the other: retire the old build's first, so an interrupt between the two
        # renames leaves a split without a manifest (refused), never an old split beside a new one
        for s in SPLITS:
            (out_dir / s / MANIFEST).unlink(missing_ok=True)
    return folders


@dataclass(frozen=True)
class Batch:
    input_ids: "torch.Tensor"  # noqa: F821  (B, T)
    labels: "torch.Tensor"  # noqa: F821  (B, T): input_ids shifted left by one


class TokenShards:
    """A memory-mapped folder of token shards (see :func:`build_token_shards`)."""

    def __init__(self, folder: str | os.PathLike, *, verify: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        if self.manifest.get("kind") != "token_shards":
            raise DataError(f"{self.folder} is not a token-shard folder (build one with `lmlab lm tokenize`)")
        check_sizes(self.folder, self.manifest, hint="re-run `lmlab lm tokenize` to rebuild it")  # a truncated shard
        dtype = np.dtype(self.manifest["dtype"])
        names = sorted(n for n in self.manifest["files"] if n.endswith(".bin"))
        self.shards = [np.memmap(self.folder / n, dtype=dtype, mode="r") for n in names]
        self.n_tokens = sum(len(s) for s in self.shards)

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    def check_tokenizer(self, tokenizer) -> None:
        if tokenizer_fingerprint(tokenizer) != self.fingerprint:
            raise ManifestMismatchError(
                f"{self.folder} was tokenized with another tokenizer than the model's; re-run "
                "`lmlab lm tokenize` with the model's tokenizer")

    def _starts(self, seq_len: int) -> np.ndarray:
        return np.array([max(0, len(s) - seq_len - 1) for s in self.shards], dtype=np.int64)

    def sample(self, seq_len: int, batch_size: int, *, seed: int, step: int, micro: int) -> Batch:
        """``batch_size`` random windows of ``seq_len + 1`` tokens, a pure function of (seed, step, micro)."""
        import torch

        starts = self._starts(seq_len)
        total = int(starts.sum())
        if total <= 0:
            raise DataError(f"{self.folder} holds {self.n_tokens} tokens: too few for windows of {seq_len + 1}")
        rng = np.random.default_rng([seed, step, micro])
        flat = rng.integers(0, total, size=batch_size)
        cum = np.cumsum(starts)
        shard = np.searchsorted(cum, flat, side="right")
        offset = flat - (cum[shard] - starts[shard])
        rows = np.stack([self.shards[s][o:o + seq_len + 1] for s, o in zip(shard, offset, strict=True)])
        t = torch.from_numpy(rows.astype(np.int64))
        return Batch(input_ids=t[:, :-1], labels=t[:, 1:])

    def sequential(self, seq_len: int, batch_size: int, *, max_batches: int | None = None) -> Iterator[Batch]:
        """Non-overlapping windows in order (for evaluation): the same batches every call."""
        import torch

        rows = []
        produced = 0
        for s in self.shards:
            for o in range(0, len(s) - seq_len - 1 + 1, seq_len):
                rows.append(np.asarray(s[o:o + seq_len + 1], dtype=np.int64))
                if len(rows) == batch_size:
                    t = torch.from_numpy(np.stack(rows))
                    yield Batch(input_ids=t[:, :-1], labels=t[:, 1:])
                    rows = []
                    produced += 1
                    if max_batches is not None and produced >= max_batches:
                        return
        if rows:
            t = torch.from_numpy(np.stack(rows))
            yield Batch(input_ids=t[:, :-1], labels=t[:, 1:])
