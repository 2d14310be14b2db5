"""Train / validation / test splits of a corpus that never put one source in two splits.

The unit of assignment is a document's group (``meta["group"]``): a Debian *source* package (so
``manpages`` and ``manpages-dev`` stay together), a PyPI project, a play, a JSONL ``source``. Groups are
visited in a seeded random order and each goes to the split furthest below its target bytes, which keeps
the byte fractions close to the targets without cutting a group.

- ``by="source"``: one pool of groups.
- ``by="license_class"``: stratified: each licence class (a group's majority class by bytes) is split
  separately, so every class is represented in every split in about the target fractions.

Each split is written as a corpus folder (``OUT/train``, ``OUT/validation``, ``OUT/test``) whose manifest
records the parent corpus, the method and the seed; the three are renamed into place together.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from lmlab.corpus.store import Corpus, CorpusWriter, StoreConfig
from lmlab.errors import ConfigError, DataError
from lmlab.io import atomic_dir

log = logging.getLogger("lmlab.corpus")

SPLITS = ("train", "validation", "test")
BY = ("source", "license_class")


@dataclass(frozen=True)
class SplitConfig:
    by: str = "source"  # "source" (groups only) or "license_class" (stratified by class, still grouped)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test (by bytes)
    seed: int = 0

    def __post_init__(self):
        if self.by not in BY:
            raise ConfigError(f"--by must be one of {', '.join(BY)}, not {self.by!r}")
        ok = len(self.fractions) == 3 and all(math.isfinite(f) and f >= 0 for f in self.fractions)
        if not ok or abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(f"fractions must be three non-negative numbers summing to 1, not {self.fractions}")


@dataclass(frozen=True)
class SplitReport:
    assignment: dict[str, str]  # group -> split
    documents: dict[str, int]  # split -> documents
    bytes: dict[str, int]  # split -> bytes
    bytes_per_class: dict[str, dict[str, int]]  # split -> licence class -> bytes


def seeded_order_key(seed: int, name: str) -> str:
    """A reproducible pseudo-random sort key for ``name`` under ``seed`` (shuffles groups or documents)."""
    return hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).hexdigest()


def assign_groups(group_bytes: dict[str, int], strata: dict[str, str], config: SplitConfig) -> dict[str, str]:
    """Map each group to a split: seeded order, each to the split furthest below its target bytes."""
    pools: dict[str, list[str]] = defaultdict(list)
    for group in group_bytes:
        pools[strata[group] if config.by == "license_class" else ""].append(group)
    assignment: dict[str, str] = {}
    fraction = dict(zip(SPLITS, config.fractions, strict=True))
    candidates = [s for s in SPLITS if fraction[s] > 0]
    for _, groups in sorted(pools.items()):
        total = sum(max(group_bytes[g], 1) for g in groups)
        filled = dict.fromkeys(SPLITS, 0)
        for group in sorted(groups, key=lambda g: seeded_order_key(config.seed, g)):
            # the split furthest below its target share of this pool (ties: train, validation, test)
            split = max(candidates, key=lambda s: (fraction[s] * total - filled[s], -SPLITS.index(s)))
            assignment[group] = split
            filled[split] += max(group_bytes[group], 1)
    return assignment


def _check_out(corpus_dir: Path, out: Path) -> None:
    """Refuse an ``out`` that would replace the corpus itself, or a folder that is not an earlier split."""
    src, dst = corpus_dir.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise DataError(f"--out {out} would replace the corpus {corpus_dir} being split: choose another folder")
    if dst.exists():
        if not dst.is_dir():
            raise DataError(f"--out {out} exists and is not a folder: choose another --out")
        foreign = sorted(p.name for p in dst.iterdir() if p.name not in SPLITS)
        if foreign:
            raise DataError(f"--out {out} exists and holds {', '.join(foreign[:3])}, not only earlier splits "
                            "(train, validation, test): choose another --out (it would be replaced)")


def split_corpus(corpus_dir: str | os.PathLike, out: str | os.PathLike, *, config: SplitConfig = SplitConfig(),
                 command: str = "") -> SplitReport:
    """Write ``out/{train,validation,test}`` corpora from ``corpus_dir`` (see the module docstring)."""
    corpus = Corpus(corpus_dir)
    _check_out(Path(corpus_dir), Path(out))
    unfinished = sorted(o for o, st in corpus.manifest.get("sources", {}).items() if st.get("status") != "complete")
    if unfinished:  # groups are placed by bytes, so the groups still to come would move others
        log.warning("%s has sources not yet complete (%s): re-run its `lmlab corpus build` first, or this split "
                    "will differ from one made after it", corpus_dir, ", ".join(unfinished[:3])
                    + (f" and {len(unfinished) - 3} more" if len(unfinished) > 3 else ""))
    group_bytes: Counter[str] = Counter()
    class_bytes: dict[str, Counter[str]] = defaultdict(Counter)
    for batch in corpus.batches(["group", "license_class", "text"]):
        for group, cls, text in zip(*(batch.column(c).to_pylist() for c in ("group", "license_class", "text")),
                                    strict=True):
            n = len(text.encode("utf-8", "surrogatepass"))
            group_bytes[group] += n
            class_bytes[group][cls] += n
    strata = {g: max(sorted(c), key=lambda k: c[k]) for g, c in class_bytes.items()}
    if not group_bytes:
        raise DataError(f"{corpus_dir} holds no documents: there is nothing to split")
    assignment = assign_groups(dict(group_bytes), strata, config)
    for s, f in zip(SPLITS, config.fractions, strict=True):
        if f > 0 and s not in assignment.values():
            log.warning("split %r gets no documents: %s has only %d groups (sources) to share between the splits; "
                        "a bigger corpus or other --fractions fill it", s, corpus_dir, len(group_bytes))
    documents = dict.fromkeys(SPLITS, 0)
    nbytes = dict.fromkeys(SPLITS, 0)
    per_class: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    extra = {"corpus": str(Path(corpus_dir).resolve()), "by": config.by, "fractions": list(config.fractions),
             "seed": config.seed}
    with atomic_dir(out) as tmp:
        writers = {s: CorpusWriter(tmp / s, config=StoreConfig(min_chars=0), command=command) for s in SPLITS}
        for s, w in writers.items():
            w.manifest["split"] = {**extra, "name": s}
        for doc in corpus.documents():
            split = assignment[doc.group]
            w = writers[split]
            if doc.origin not in w.sources:
                w.start_source(doc.origin)
            w.add(doc)
            documents[split] += 1
            nbytes[split] += doc.n_bytes
            per_class[split][doc.license_class] += doc.n_bytes
        for w in writers.values():
            for origin in list(w.sources):
                w.finish_source(origin)
            w.close()
    return SplitReport(assignment=assignment, documents=documents, bytes=nbytes,
                       bytes_per_class={s: dict(c) for s, c in per_class.items()})
