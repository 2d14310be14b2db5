"""Harvest a user's own text: a plain folder with a LICENSE file, and JSONL files.

- ``dir:PATH``: every ``.txt/.md/.rst/.text`` file under PATH is a document (``.jsonl`` files inside are read
  as below). Its licence is the folder's top-level ``LICENSE``/``LICENCE``/``COPYING`` file (a name such as
  ``MIT`` or a whole licence text), overridden per file by an ``SPDX-License-Identifier:`` line;
  ``unknown`` without either. Each file is its own group for splits.
- ``jsonl:FILE``: one JSON object per line with ``text``, optional ``license`` (an SPDX expression or
  licence name) and optional ``source`` (what the line came from; it is also the line's group).
  Lines that are not such objects, or hold strings that are not valid Unicode, are counted and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmlab.corpus.document import Document
from lmlab.corpus.harvest import formats
from lmlab.corpus.harvest.base import Harvester, Unreadable
from lmlab.corpus.licenses import UNKNOWN, License, classify, spdx_header

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "UNLICENSE")


def folder_license(folder: Path) -> tuple[License, Path | None]:
    """The licence stated by a top-level LICENSE/LICENCE/COPYING file (any suffix), and that file."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.upper().split(".")[0] in LICENSE_NAMES:
            try:
                return classify(formats.decode_text(p.read_bytes())), p
            except (Unreadable, OSError):
                return UNKNOWN, p
    return UNKNOWN, None


def _utf8_encodable(record: dict) -> bool:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no shard (UTF-8 Parquet) can store."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(harvester: Harvester, path: Path, default_license: License) -> Iterator[Document]:
    """The documents of one JSONL file; bad lines are reported through ``harvester.skip``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                harvester.skip("non_utf8", where)
                continue
            except json.JSONDecodeError as e:
                harvester.skip("malformed_jsonl", where, e.msg)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                harvester.skip("malformed_jsonl", where, 'not an object with a string "text"')
                continue
            if not _utf8_encodable(record):
                harvester.skip("non_utf8", where, "a lone surrogate escape (\\ud800...) is not text")
                continue
            license = classify(str(record["license"])) if record.get("license") else default_license
            given = record.get("source")
            source = f"jsonl:{given}" if given else f"jsonl:{path}#L{lineno}"
            yield harvester.document(record["text"], source, license, group=source, path=str(path), line=lineno)


class JsonlHarvester(Harvester):
    """Documents from a JSONL file: ``{"text": ..., "license": ..., "source": ...}`` per line."""

    def __init__(self, path: str | Path, *, origin: str | None = None):
        super().__init__(origin or f"jsonl:{path}")
        self.path = Path(path)

    def check(self) -> None:
        self.check_path(self.path, folder=False, hint=" (jsonl: takes one JSONL file, dir: a folder)")

    def documents(self) -> Iterator[Document]:
        if not self.path.is_file():
            self.skip("missing", str(self.path))
            return
        yield from read_jsonl(self, self.path, UNKNOWN)


class DirHarvester(Harvester):
    """Text files of a plain folder, licensed by its LICENSE file (see the module docstring)."""

    def __init__(self, path: str | Path, *, origin: str | None = None):
        super().__init__(origin or f"dir:{path}")
        self.path = Path(path)

    def check(self) -> None:
        self.check_path(self.path, folder=True, hint=" (dir: takes a folder of text files, jsonl: one JSONL file)")

    def documents(self) -> Iterator[Document]:
        if not self.path.is_dir():
            self.skip("missing", str(self.path))
            return
        license, license_file = folder_license(self.path)
        root = self.path.resolve()
        for p in sorted(self.path.rglob("*")):
            if not p.is_file() or p == license_file:
                continue
            if not p.resolve().is_relative_to(root):  # a link out of the folder: the folder's licence says nothing
                self.skip("outside_folder", str(p), f"links to {p.resolve()}, outside {root}")
                continue
            suffix = p.suffix.lower()
            if suffix == ".jsonl":
                yield from read_jsonl(self, p, license)
                continue
            if suffix not in TEXT_SUFFIXES:
                continue
            try:
                text = formats.decode_text(p.read_bytes())
            except Unreadable as e:
                self.skip(e.reason, str(p), str(e))
                continue
            except OSError as e:
                self.skip("unreadable", str(p), str(e))
                continue
            rel = str(p.relative_to(self.path))
            source = f"dir:{root}:{rel}"
            yield self.document(text, source, spdx_header(text) or license, group=source, path=rel)
