"""File formats the harvesters turn into plain text.

- :func:`decode_text`: UTF-8 or nothing (binary files and other encodings are reported, not guessed).
- :func:`read_maybe_gz`: a file's bytes, gunzipped when it ends in ``.gz`` (or dictzip ``.dz``).
- :func:`html_to_text`: visible text of an HTML page (stdlib ``html.parser``: the maintained converters
  are GPL (html2text) or pull in a parser stack for what is a 40-line job here).
- :class:`ManRenderer`: a troff man page rendered to plain text by ``groff`` (Debian's ``man`` uses the
  same formatter), hyphenation and justification off, dated by the caller rather than by the clock; where
  groff is missing, :func:`strip_troff` keeps the text of the requests and drops the markup (documented
  fallback, not a typesetter).
- :func:`dictd_entries`: entries of a dictd dictionary (``.index`` + ``.dict.dz``, as in ``dict-gcide``).
- :func:`sword_books`: books of a SWORD ``zText`` Bible module (as in ``sword-text-web``), OSIS markup
  stripped, footnotes dropped.
"""

from __future__ import annotations

import gzip
import html
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmlab.corpus.harvest.base import Unreadable

TEXT_PROBE = 8192  # bytes inspected for NULs


def decode_text(data: bytes) -> str:
    """UTF-8 text, or :class:`Unreadable` (``binary`` for NUL bytes, ``non_utf8`` for other encodings)."""
    if b"\0" in data[:TEXT_PROBE]:
        raise Unreadable("binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable("non_utf8", f"byte {e.start}") from None
    return text.removeprefix("\ufeff")


def read_maybe_gz(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when it ends in ``.gz`` or ``.dz`` (dictzip); :class:`Unreadable` on errors."""
    try:
        if path.suffix in (".gz", ".dz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise Unreadable("unreadable", str(e)) from None


class _TextExtractor(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article",
             "table", "ul", "ol", "dl", "dt", "dd", "blockquote", "hr", "title", "header", "footer"}
    HIDDEN = {"script", "style", "head", "nav", "noscript", "svg"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(source: str) -> str:
    """The visible text of an HTML document: scripts, styles and navigation dropped, blocks on their own lines."""
    parser = _TextExtractor()
    parser.feed(source)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_man_alias(data: bytes) -> bool:
    """A ``.so other.1`` stub: an alias of another page, not a page of its own."""
    lines = [ln for ln in data.splitlines() if ln.strip() and not ln.startswith((b'.\\"', b"'\\\""))]
    return bool(lines) and len(lines) <= 2 and lines[0].startswith(b".so ")


@dataclass(frozen=True)
class ManRenderer:
    """Render troff man pages to plain text (``groff -Tutf8 -mandoc``), falling back to :func:`strip_troff`."""

    width: int = 100  # line length in characters (``-rLL``)
    timeout_s: float = 30.0

    @property
    def groff(self) -> str | None:
        return shutil.which("groff")

    def render(self, data: bytes, *, date: float = 0.0) -> str:
        """The page as text. ``date`` (seconds since the epoch; the harvesters pass the page file's mtime,
        which dpkg sets from the package) is the date groff prints where a page gives none: mdoc pages that
        say ``.Dd $Mdocdate$`` (tmux, OpenSSH) would otherwise be dated today, so the same package would
        render differently, and a corpus built from it would differ, from one day to the next."""
        groff = self.groff
        if groff is None:
            return strip_troff(decode_text(data))
        # .ad l: no justification (no runs of spaces); -rHY=0: no hyphenation; -P-cbou: no overstrike or SGR
        cmd = [groff, "-k", "-Tutf8", "-mandoc", "-rHY=0", f"-rLL={self.width}n", "-P-cbou"]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(max(0, int(date)))}  # groff's clock (its \n[year] etc.)
        try:
            out = subprocess.run(cmd, input=b".ad l\n" + data, capture_output=True, timeout=self.timeout_s,
                                 check=False, env=env)
        except subprocess.TimeoutExpired:
            raise Unreadable("unreadable", f"groff took over {self.timeout_s:.0f} s") from None
        if out.returncode != 0 or not out.stdout.strip():
            raise Unreadable("unreadable", out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or "groff")
        text = out.stdout.decode("utf-8", "replace")
        return re.sub(r"\n{3,}", "\n\n", "\n".join(ln.rstrip() for ln in text.splitlines())).strip()


_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other named glyphs
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[,/&|^%:!]"), ""),  # italic corrections, zero-width and break points
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
]


def strip_troff(source: str) -> str:
    """Plain text from troff source without a formatter: section headings kept, requests and escapes dropped."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            request, _, args = line[1:].partition(" ")
            if request in ("SH", "SS", "TH"):
                out += ["", args.strip().strip('"')]
            elif request in ("B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB"):
                out.append(" ".join(a.strip('"') for a in args.split()) if request in ("B", "I", "SM", "SB")
                           else "".join(a.strip('"') for a in args.split()))
            elif request in ("PP", "P", "LP", "TP", "IP", "sp", "br"):
                out.append("")
                if request == "IP" and args:
                    out.append(args.split('"')[1] if args.startswith('"') else args.split()[0])
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, repl in _TROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# -- dictd ----------------------------------------------------------------------------------------
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_entries(index_path: Path, dict_path: Path) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd database in file order, ``00-database-*`` metadata skipped.

    ``.index`` lines are ``headword TAB offset TAB length`` in dictd's base-64 digits; ``.dict.dz`` is
    dictzip, which plain gzip reads. Headwords sharing one entry yield it once.
    """
    data = read_maybe_gz(dict_path)
    try:
        lines = index_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Unreadable("unreadable", f"{index_path}: {e}") from None
    spans: dict[tuple[int, int], str] = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        try:
            span = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        except KeyError:
            continue
        spans.setdefault(span, parts[0])
    for (start, length), headword in sorted(spans.items()):
        try:
            yield headword, data[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            continue


# -- SWORD zText ----------------------------------------------------------------------------------
def read_sword_conf(path: Path) -> dict[str, str]:
    """The ``key=value`` lines of a SWORD module's ``mods.d/*.conf`` (first value of each key)."""
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("[") and "name" not in conf:
            conf["name"] = line.strip("[] ")
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            conf.setdefault(key.strip(), value.strip())
    return conf


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_BREAK = re.compile(r'<(?:chapter|div)\b[^>]*/>|<lb\b[^>]*/>|</?p\b[^>]*>|<l\b[^>]*/>')
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_TAG = re.compile(r"<[^>]+>")
_OSIS_BOOK = re.compile(r'<div\b(?=[^>]*type="book")(?=[^>]*sID=)[^>]*osisID="([^"]+)"')


def osis_to_text(markup: str) -> str:
    """Text of OSIS markup: footnotes dropped, titles and paragraphs on their own lines, entities decoded."""
    text = _OSIS_NOTE.sub("", markup)
    text = _OSIS_TITLE.sub(lambda m: f"\n\n{m[1]}\n\n", text)
    text = _OSIS_BREAK.sub("\n", text)
    text = html.unescape(_OSIS_TAG.sub("", text))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sword_books(module_dir: Path) -> Iterator[tuple[str, str]]:
    """(book id, text) for each compressed block of a zText module (blocks are books with BlockType=BOOK).

    Layout (SWORD's zverse.cpp): ``{ot,nt}.bzs`` holds (offset, compressed size, size) per block as three
    little-endian uint32; ``.bzv`` holds (block, offset, size) per verse as uint32, uint32, uint16; ``.bzz``
    holds the zlib-compressed blocks. Verses are joined with spaces.
    """
    for testament in ("ot", "nt"):
        files = [module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")]
        if not all(f.is_file() for f in files):
            continue
        try:
            bzs, bzv, bzz = (f.read_bytes() for f in files)
        except OSError as e:
            raise Unreadable("unreadable", str(e)) from None
        verses: dict[int, list[tuple[int, int]]] = {}
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i * 10)
            if size:
                verses.setdefault(block, []).append((offset, size))
        for block in sorted(verses):
            if (block + 1) * 12 > len(bzs):
                raise Unreadable("unreadable", f"{module_dir}: verse index points past the block index")
            offset, csize, _ = struct.unpack_from("<III", bzs, block * 12)
            try:
                raw = zlib.decompress(bzz[offset:offset + csize])
            except zlib.error as e:
                raise Unreadable("unreadable", f"{module_dir}: block {block}: {e}") from None
            markup = " ".join(raw[o:o + n].decode("utf-8", "replace") for o, n in verses[block])
            book = _OSIS_BOOK.search(markup)
            text = osis_to_text(markup)
            if text:
                yield (book[1] if book else f"{testament}-{block}"), text
