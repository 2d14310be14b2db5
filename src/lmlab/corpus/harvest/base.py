"""What every harvester shares: its ``--from`` spec, document construction, and counting bad input.

A harvester is a class whose :meth:`Harvester.documents` yields :class:`~lmlab.corpus.document.Document`
objects. Bad input (an unreadable man page, a binary file, a malformed licence file) never stops it:
:meth:`Harvester.skip` logs a warning with the path and counts the reason; the build copies the counts
into the corpus manifest.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lmlab.corpus.document import Document
from lmlab.corpus.licenses import License
from lmlab.errors import DataError

log = logging.getLogger("lmlab.corpus")

MAX_EXAMPLES = 5  # paths remembered per skip reason


class Unreadable(Exception):
    """A file that cannot become a document; ``reason`` is the manifest's skip key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Harvester:
    """Base class: ``origin`` is the ``--from`` spec (``debian``, ``deb:dict-gcide``, ``wheels:DIR``...)."""

    def __init__(self, origin: str):
        self.origin = origin
        self.skipped: Counter[str] = Counter()
        self.skip_examples: dict[str, list[str]] = {}

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def check(self) -> None:
        """Refuse, before anything is written, input that cannot be harvested (a path given by the user that does
        not exist or is the wrong kind); what only harvesting finds out is counted by :meth:`skip` instead."""

    def check_path(self, path: Path, *, folder: bool | None, hint: str = "") -> None:
        """:meth:`check` for a user's path: it must exist and be a folder (``folder=True``), a file (False), or
        either (None); ``hint`` is added to the message for a path of the wrong kind."""
        if not path.exists():
            raise DataError(f"--from {self.origin}: {path} does not exist")
        if folder is not None and path.is_dir() != folder:
            found, wanted = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
            raise DataError(f"--from {self.origin}: {path} is {found}, not {wanted}{hint}")

    def skip(self, reason: str, path: str, detail: str = "") -> None:
        """Log and count one bad input (the file is left out, or its licence is unknown); the build goes on."""
        log.warning("%s: %s: %s%s", self.origin, reason, path, f" ({detail})" if detail else "")
        self.skipped[reason] += 1
        examples = self.skip_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(path)

    def document(self, text: str, source: str, license: License, *, group: str, **meta) -> Document:
        return Document.create(text, source, license, group=group, origin=self.origin, **meta)
