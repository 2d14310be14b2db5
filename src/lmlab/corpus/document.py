"""The unit of a corpus: a text with its provenance and licence.

``Document(id, text, source, license, license_class, meta)``:

- ``source`` says exactly where the text came from: harvester, package, version and the file inside it,
  e.g. ``debian:coreutils@9.1-1:/usr/share/man/man1/ls.1.gz`` or ``wheel:requests@2.31.0:requests/api.py``;
- ``license`` is an SPDX expression (``LicenseRef-...`` or ``NOASSERTION`` where SPDX has no identifier)
  and ``license_class`` its class (:class:`lmlab.corpus.licenses.LicenseClass`);
- ``id`` is derived from the source and the text (:func:`document_id`), so it is stable across rebuilds;
- ``meta`` holds the rest; two keys have a fixed meaning: ``group`` (the unit that must stay inside one
  split: a Debian source package, a PyPI project, a play) and ``origin`` (the ``--from`` spec that
  harvested it). :func:`text_hash` is the exact-duplicate key: a hash of the normalised text.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from lmlab.corpus.licenses import License


def document_id(source: str, text: str) -> str:
    """32 hex digits of BLAKE2b over the source and the text: the same file harvested again gets the same id."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def normalise_text(text: str) -> str:
    """What counts as "the same text" for de-duplication: Unicode NFC, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())  # str.split: several times faster than re.sub


def text_hash(text: str) -> str:
    """The exact-duplicate key: BLAKE2b of :func:`normalise_text` (32 hex digits)."""
    return hashlib.blake2b(normalise_text(text).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str
    license: str
    license_class: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, text: str, source: str, license: License, **meta: Any) -> Document:
        """A document whose id is derived from ``source`` and ``text``; ``meta`` should name its ``group``."""
        return cls(id=document_id(source, text), text=text, source=source, license=license.expression,
                   license_class=str(license.license_class), meta=meta)

    @property
    def group(self) -> str:
        """The unit that must not be split across train/validation/test (defaults to the source)."""
        return str(self.meta.get("group") or self.source)

    @property
    def origin(self) -> str:
        """The ``--from`` spec that harvested this document ('' when unknown)."""
        return str(self.meta.get("origin", ""))

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass"))
