"""Command-line references from man pages: troff parsed to structure, then to catalogue :class:`Tool` s.

Reads the man(7) subset that generated CLI references use (the gcloud reference shipped in Debian's
``google-cloud-cli``: ``.TH``, ``.SH``, ``.TP``, ``.RS``/``.RE``, ``.IP``, ``.HP``, ``.sp``, font
escapes ``\\fB \\fI \\f5 \\fR``, character escapes ``\\- \\e \\(em``) into a :class:`ManPage`:

- NAME -> command name and one-line summary;
- SYNOPSIS -> parameters and which are required: an element outside every ``[...]`` is required; a
  ``( A | B )`` group outside brackets means one of its members is required; in ``( A : B )`` the part
  before ``:`` is required and the rest modifies it (the gcloud synopsis conventions);
- POSITIONAL ARGUMENTS and every ``... FLAGS`` section except GCLOUD WIDE FLAGS -> ``.TP`` items
  (term, description), at any nesting depth; group headers ("At most one of these can be specified:")
  are skipped; ``--[no-]flag`` gives the flag and its ``--no-`` alias;
- EXAMPLES -> (request, command) pairs: a paragraph followed by an indented block holding exactly one
  ``$ command`` (continuation lines ending in ``\\`` are kept; :mod:`lmlab.tools.cloud_cli` joins them);
- tbl(1) tables (``.TS`` ... ``.TE``, :func:`parse_table`) -> one line per row, cells separated by a tab,
  as many cells as the table's format line has columns; they appear in the section text and in flag
  descriptions (53 of the 16,630 gcloud pages on this image have tables: key/value lists such as the
  ``--scopes`` aliases of ``gcloud compute instances create``).

Not implemented: macros from other packages (mdoc), tbl's spanned and vertically spanned cells (kept
as empty cells), and man pages of other generators beyond what the same requests cover.
"""

from __future__ import annotations

import gzip
import logging
import re
import shlex
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import ConfigError, DataError
from lmlab.tools.catalog import Example, Parameter, Tool

log = logging.getLogger("lmlab.tools")

_ESCAPE = re.compile(r"\\(f(?:\(..|\[[^\]]*\]|.)|\(..|\[[^\]]*\]|\*.|.)")
_CHARS = {"em": "\u2014", "en": "\u2013", "bu": "\u2022", "aq": "'", "dq": '"', "co": "\u00a9", "rg": "\u00ae",
          "lq": '"', "rq": '"', "oq": "'", "cq": "'", "hy": "-", "mi": "-", "ti": "~", "ha": "^"}
_SIMPLE = {"-": "-", "e": "\\", " ": " ", "'": "'", "`": "`", "&": "", "|": "", "^": "", "~": " ", "0": " ",
           ".": ".", "\\": "\\", "%": "", "c": ""}
# font markers kept by unescape(keep_fonts=True): B bold, I italic, 5/C code, R roman
BOLD, ITALIC, CODE, ROMAN = "\x01B", "\x01I", "\x01C", "\x01R"


def unescape(text: str, *, keep_fonts: bool = False) -> str:
    """Replace troff escapes by characters; font changes vanish (or become ``\\x01X`` markers)."""

    def sub(m: re.Match) -> str:
        s = m.group(1)
        if s[0] == "f" and len(s) > 1:
            if not keep_fonts:
                return ""
            font = s[1:].strip("([]")
            return {"B": BOLD, "I": ITALIC, "5": CODE, "C": CODE, "CW": CODE, "R": ROMAN, "P": ROMAN}.get(font, ROMAN)
        if s[0] == "(":
            return _CHARS.get(s[1:], "")
        if s[0] == "[":
            return _CHARS.get(s[1:-1], "")
        if s[0] == "*":
            return ""
        return _SIMPLE.get(s, s)

    return _ESCAPE.sub(sub, text)


def strip_fonts(text: str) -> str:
    return re.sub("\x01.", "", text)


@dataclass
class _Line:
    """One event of a section: text (with font markers) or a request, at an .RS depth."""

    kind: str  # "text" | "break" | "tp" | "ip" | "rs" | "re" | "row" (a table row, cells joined by tabs)
    text: str
    depth: int


@dataclass(frozen=True)
class Item:
    """A ``.TP`` item: term (plain text), description, nesting depth and the section it is in."""

    term: str
    description: str
    depth: int
    section: str
    term_fonts: str = ""  # the term with font markers


@dataclass
class ManPage:
    """A man page parsed to structure."""

    title: str  # .TH title
    name: str  # "gcloud compute instances create"
    summary: str
    sections: dict[str, str] = field(default_factory=dict)  # section name -> plain text
    synopsis: str = ""  # plain text
    synopsis_fonts: str = ""  # with font markers
    items: list[Item] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    source: str = ""


def _read(path: Path) -> str:
    """The page's text; an unreadable file or damaged ``.gz`` is a DataError (a truncated gzip raises
    EOFError, which click would otherwise report as an interrupt)."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable man page ({e})") from None
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Table:
    """A tbl(1) table: rows of cells (plain text) and whether the first row is a header (bold format)."""

    rows: list[list[str]]
    header: bool = False

    def lines(self) -> list[str]:
        return ["\t".join(r).rstrip("\t") for r in self.rows]



def _format_columns(line: str) -> list[list[str]]:
    """Column specs of format line(s) ("lB lB, l l." -> [["lB", "lB"], ["l", "l"]]); '|' separators dropped."""
    rows = []
    for part in line.rstrip().rstrip(".").split(","):
        cols = [t for t in re.findall(r"[lrcnasLRCNAS^_=][^\slrcnasLRCNAS^_=|]*", part) if t]
        if cols:
            rows.append(cols)
    return rows


def parse_table(lines: list[str]) -> Table:
    """The lines between ``.TS`` and ``.TE``: an optional options line ending in ';' (``tab(x)`` sets the
    cell separator, default a tab), format lines up to one ending in '.', then data. Each data line is one
    row split into as many cells as its format has columns (extra separators stay in the last cell); rows
    of '_' or '=' are rules and dropped; ``T{`` ... ``T}`` text blocks become one cell; ``.T&`` (new format
    lines) and other requests are skipped. Cells are unescaped and font changes removed."""
    sep = "\t"
    i = 0
    if lines and lines[0].rstrip().endswith(";"):
        m = re.search(r"tab\s*\((.)\)", lines[0])
        sep = m.group(1) if m else sep
        i = 1
    formats: list[list[str]] = []
    while i < len(lines):  # format lines, the last ends with '.'
        formats += _format_columns(lines[i])
        done = lines[i].rstrip().endswith(".")
        i += 1
        if done:
            break
    if not formats:
        raise DataError("a table (.TS) without a format line")
    header = all("B" in c[1:] for c in formats[0]) and len(formats) > 1
    rows: list[list[str]] = []
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith((".", "'")):
            if line.startswith(".T&"):  # new format lines follow, up to one ending in '.'
                while i < len(lines) and not lines[i].rstrip().endswith("."):
                    i += 1
                i += 1
            continue
        if line.strip() in ("_", "=", ""):
            continue
        while line.rstrip().endswith("T{"):  # a text block: the cell runs to a line starting with T}
            block = []
            while i < len(lines) and not lines[i].startswith("T}"):
                if not lines[i].startswith((".", "'")):
                    block.append(lines[i].strip())
                i += 1
            rest = lines[i][2:] if i < len(lines) else ""
            i += 1
            line = line.rstrip()[:-2] + " ".join(block) + rest
        ncols = len(formats[min(len(rows), len(formats) - 1)])
        cells = line.split(sep, max(ncols - 1, 0))
        cells += [""] * (ncols - len(cells))
        rows.append([" ".join(strip_fonts(unescape(c)).split()) for c in cells])
    return Table(rows, header)


def _events(lines: list[str]) -> list[_Line]:
    """The requests and text lines of one section, with their .RS depth (table rows as "row" events)."""
    out: list[_Line] = []
    depth = 0
    k = 0
    while k < len(lines):
        raw = lines[k]
        k += 1
        if raw.startswith(".TS"):
            end = next((j for j in range(k, len(lines)) if lines[j].startswith(".TE")), len(lines))
            try:
                rows = parse_table(lines[k:end]).lines()
            except DataError:  # a malformed table is dropped, not the page
                rows = []
            out += [_Line("break", "", depth), *(_Line("row", row, depth) for row in rows), _Line("break", "", depth)]
            k = end + 1
            continue
        if raw.startswith(("'", ".")) and not raw.startswith(".\\\""):
            req, _, arg = raw[1:].partition(" ")
            req = req.strip()
            if req == "RS":
                depth += 1
                out.append(_Line("rs", "", depth))
            elif req == "RE":
                depth = max(0, depth - 1)
                out.append(_Line("re", "", depth))
            elif req in ("sp", "PP", "P", "LP", "br"):
                out.append(_Line("break", "", depth))
            elif req == "TP":
                out.append(_Line("tp", "", depth))
            elif req == "IP":
                out.append(_Line("ip", unescape(arg.strip().strip('"')), depth))
            elif req in ("B", "I", "BR", "IR", "RB", "RI"):
                out.append(_Line("text", unescape(arg.replace('"', ""), keep_fonts=True), depth))
            # .HP, .nf, .fi, .TH, .SH and unknown requests carry no text of their own
            continue
        if raw.startswith(".\\\""):  # comment
            continue
        if not raw.strip():
            out.append(_Line("break", "", depth))
            continue
        out.append(_Line("text", unescape(raw, keep_fonts=True), depth))
    return out


def _plain(events: list[_Line]) -> str:
    """Paragraphs of plain text (indented blocks indented by two spaces per level)."""
    paras: list[str] = []
    cur: list[str] = []
    base = min((e.depth for e in events), default=0)

    def flush():
        if cur:
            paras.append(" ".join(cur) if not (cur[0].startswith(" ") or table) else "\n".join(cur))
            cur.clear()

    table = False
    for e in events:
        if (e.kind == "row") != table:  # a table starts or ends: it is a paragraph of its own, one row a line
            flush()
            table = e.kind == "row"
        if e.kind == "row":
            cur.append("  " * (e.depth - base) + e.text)
        elif e.kind == "text":
            indent = "  " * (e.depth - base)
            text = strip_fonts(e.text)
            if indent and text.startswith("$ "):
                cur.append(indent + text)
            else:
                cur.append(text if not indent else indent + text)
        elif e.kind == "ip":
            flush()
            cur.append(f"{e.text} " if e.text else "")
        elif e.kind in ("break", "rs", "re", "tp"):
            flush()
    flush()
    return "\n\n".join(p.strip("\n") for p in paras if p.strip())


def _items(section: str, events: list[_Line]) -> list[Item]:
    """``.TP`` items: the term is the first text line after .TP; the body runs to the next item at the same depth."""
    items = []
    for i, e in enumerate(events):
        if e.kind != "tp":
            continue
        j = i + 1
        while j < len(events) and events[j].kind == "break":
            j += 1
        if j >= len(events) or events[j].kind != "text":
            continue
        term = events[j].text
        body = []
        for k in range(j + 1, len(events)):
            f = events[k]
            if (f.kind == "tp" and f.depth <= e.depth) or (f.kind == "re" and f.depth < e.depth):
                break
            body.append(f)
        items.append(Item(strip_fonts(term).strip(), _plain(body), e.depth, section, term))
    return items


_LEAD = re.compile(r"^(?:to|in order to)\s+", re.I)
_TRAIL = re.compile(r"[\s,]*(?:then\s+)?(?:run|use|enter|type|execute|issue|invoke|try)(?:\s+the\s+following"
                    r"(?:\s+command)?)?(?:\s+(?:the\s+)?command)?\s*:?\s*$|\s*:\s*$", re.I)


def clean_request(text: str) -> str:
    """A request from an example's lead-in: "To create an instance, run:" -> "Create an instance"."""
    text = " ".join(text.split())
    text = _TRAIL.sub("", text).strip().rstrip(",.;:")
    text = _LEAD.sub("", text)
    return text[:1].upper() + text[1:]


def _examples(events: list[_Line]) -> list[Example]:
    """(request, command) pairs: the last paragraph before an indented block with exactly one ``$`` command."""
    out: list[Example] = []
    para: list[str] = []
    closed = False
    i = 0
    while i < len(events):
        e = events[i]
        if e.kind == "rs" and e.depth == 1:
            block = []
            i += 1
            while i < len(events) and not (events[i].kind == "re" and events[i].depth == 0):
                if events[i].kind == "text":
                    block.append(strip_fonts(events[i].text))
                i += 1
            commands = _commands(block)
            request = clean_request(" ".join(para))
            if len(commands) == 1 and request:
                out.append(Example(request, commands[0]))
            para = []
        elif e.kind == "text" and e.depth == 0:
            if closed:  # a new paragraph starts: keep only the one right before the block
                para, closed = [], False
            para.append(strip_fonts(e.text))
        elif e.kind in ("break", "ip", "tp"):
            closed = True
        i += 1
    return out


def _commands(block: list[str]) -> list[str]:
    """Commands in a code block: lines starting with ``$ `` plus their ``\\`` continuation lines."""
    commands: list[list[str]] = []
    cont = False
    for line in block:
        s = line.strip()
        if s.startswith("$ "):
            commands.append([s[2:].strip()])
        elif cont and commands:
            commands[-1].append(line.rstrip())
        else:
            cont = False
            continue
        cont = s.endswith("\\") or _open_quote("\n".join(commands[-1]))
    return ["\n".join(c) for c in commands]


def _open_quote(text: str) -> bool:
    """Whether a shell command's quotes are still open at the end of ``text``."""
    try:
        shlex.split(text)
    except ValueError:
        return True
    return False


def parse_manpage(text: str, *, source: str = "") -> ManPage:
    """Parse one man page's troff source."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    title = ""
    current = None
    for line in text.splitlines():
        if line.startswith(".TH"):
            title = line[3:].strip().split()[0].strip('"') if line[3:].strip() else ""
            continue
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"').upper()
            if current in sections:  # a repeated heading continues the section
                continue
            sections[current] = []
            order.append(current)
            continue
        if current is not None:
            sections[current].append(line)
    if "NAME" not in sections:
        raise DataError(f"{source or 'man page'} has no NAME section: not a man(7) page")
    ev = {s: _events(lines) for s, lines in sections.items()}
    name_line = " ".join(strip_fonts(e.text) for e in ev["NAME"] if e.kind == "text").strip()
    name, _, summary = name_line.partition(" - ")
    page = ManPage(title=title, name=" ".join(name.split()), summary=summary.strip(), source=source)
    for s in order:
        page.sections[s] = _plain(ev[s])
    if "SYNOPSIS" in ev:
        page.synopsis_fonts = " ".join(e.text for e in ev["SYNOPSIS"] if e.kind == "text")
        page.synopsis = " ".join(strip_fonts(page.synopsis_fonts).split())
    for s in order:
        if s == "POSITIONAL ARGUMENTS" or (s.endswith("FLAGS") and s != "GCLOUD WIDE FLAGS"):
            page.items += _items(s, ev[s])
    if "EXAMPLES" in ev:
        page.examples = _examples(ev["EXAMPLES"])
    return page


def read_manpage(path: str | Path) -> ManPage:
    """Parse a man page file (``.gz`` or plain)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return parse_manpage(_read(path), source=str(path))


# -- synopsis -> parameters ------------------------------------------------------------------------

_FLAG = re.compile(r"^(-{1,2}(?:\[no-\])?[A-Za-z0-9][\w.-]*)")


@dataclass
class _Syn:
    kind: str  # "flag" | "pos" | "[" | "]" | "(" | ")" | "|" | ":"
    name: str = ""
    metavar: str = ""
    aliases: list[str] = field(default_factory=list)
    repeated: bool = False


def _value_spec(s: str, i: int) -> tuple[str, int]:
    """The flag value spec starting at s[i] (after '='), up to whitespace/';' at bracket balance 0."""
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c in "[(":
            depth += 1
        elif c in "])":
            if depth == 0:
                break
            depth -= 1
        elif (c.isspace() or c == ";") and depth == 0:
            break
        j += 1
    return strip_fonts(s[i:j]), j


def synopsis_tokens(fonts: str) -> list[_Syn]:
    """Tokenise a synopsis with font markers: flags (bold), positionals (italic), brackets, '|' and ':'."""
    s = fonts
    # drop the command path (code font) and the trailing GCLOUD_WIDE_FLAG placeholder
    s = re.sub("\x01C.*?\x01R", " ", s, count=1)
    s = re.sub(r"\[\x01I[A-Z_]*WIDE_FLAG[^\]]*\]", " ", s)
    toks: list[_Syn] = []
    i = 0
    last_end = 0  # where the previous token ended (to spot ", -z" aliases)
    while i < len(s):
        c = s[i]
        if c == "\x01":
            font = s[i + 1]
            start = i
            end = s.find("\x01R", i + 2)
            end = len(s) if end < 0 else end
            word = strip_fonts(s[i + 2:end])
            i = end + 2
            if font == "B" and word.startswith("-"):
                tok = _Syn("flag", word)
                if i < len(s) and s[i] == "=":
                    tok.metavar, i = _value_spec(s, i + 1)
                elif s[i:i + 1] == " " and s[i + 1:i + 3] == "\x01I":  # "-z ZONE"
                    end2 = s.find("\x01R", i + 3)
                    tok.metavar = strip_fonts(s[i + 3:end2])
                    i = end2 + 2
                between = strip_fonts(s[last_end:start]).strip()
                if toks and toks[-1].kind == "flag" and (between == "," or (not between and
                                                                            toks[-1].metavar.endswith(","))):
                    toks[-1].metavar = toks[-1].metavar.removesuffix(",")
                    toks[-1].aliases.append(word)
                else:
                    toks.append(tok)
                last_end = i
            elif font == "I" and word and not word.startswith("-"):
                name = word.replace("...", "").strip()
                if toks and toks[-1].kind == "pos" and toks[-1].name == name:
                    toks[-1].repeated = True
                elif s[i:i + 6].strip().startswith("...") and toks and toks[-1].kind == "[" and len(toks) > 1 \
                        and toks[-2].kind == "pos" and toks[-2].name == name:
                    toks.pop()  # "NAME [NAME ...]": the bracket opened for the repetition
                    toks[-1].repeated = True
                    close = s.find("]", i)
                    i = close + 1 if close >= 0 else i
                else:
                    toks.append(_Syn("pos", name, repeated="..." in word or s[i:i + 6].lstrip().startswith("...")))
                last_end = i
            continue
        if c in "[]()|:":
            toks.append(_Syn(c))
            last_end = i + 1
        i += 1
    return toks


@dataclass
class SynopsisArgs:
    """What a synopsis says about arguments, in order of appearance."""

    flags: dict[str, _Syn] = field(default_factory=dict)
    positionals: list[_Syn] = field(default_factory=list)
    required: set[str] = field(default_factory=set)
    one_of_required: list[tuple[str, ...]] = field(default_factory=list)


def parse_synopsis(fonts: str) -> SynopsisArgs:
    """Parameters and required-ness from a synopsis (rules in the module docstring)."""
    toks = synopsis_tokens(fonts)
    out = SynopsisArgs()
    pos = 0

    def names(node) -> list[str]:
        acc = []
        for x in node:
            if isinstance(x, list):
                acc += names(x)
            elif x.kind in ("flag", "pos"):
                acc.append(x.name)
        return acc

    def parse_seq(close: str | None) -> list:
        nonlocal pos
        seq: list = []
        while pos < len(toks):
            t = toks[pos]
            pos += 1
            if t.kind in "[(":
                sub = parse_seq("]" if t.kind == "[" else ")")
                seq.append([_Syn(t.kind), *sub])
            elif t.kind == close:
                return seq
            elif t.kind in "])":
                continue  # unbalanced: ignore
            else:
                seq.append(t)
                if t.kind == "flag":
                    out.flags.setdefault(_canonical(t.name), t)
                elif t.kind == "pos" and all(p.name != t.name for p in out.positionals):
                    out.positionals.append(t)
        return seq

    def walk(seq: list, required: bool) -> None:
        alts = _split(seq, "|")
        if required and len(alts) > 1:
            group = tuple(dict.fromkeys(_canonical(n) for n in names(seq)))
            if group:
                out.one_of_required.append(group)
            required = False
        for alt in alts:
            segs = _split(alt, ":")
            for k, seg in enumerate(segs):
                req = required and k == 0
                for x in seg:
                    if isinstance(x, list):
                        walk(x[1:], req and x[0].kind == "(")
                    elif x.kind in ("flag", "pos") and req:
                        out.required.add(_canonical(x.name) if x.kind == "flag" else x.name)

    tree = parse_seq(None)
    walk(tree, True)
    return out


def _split(seq: list, sep: str) -> list[list]:
    parts: list[list] = [[]]
    for x in seq:
        if not isinstance(x, list) and x.kind == sep:
            parts.append([])
        else:
            parts[-1].append(x)
    return parts


def _canonical(flag: str) -> str:
    """``--[no-]x`` -> ``--x``."""
    return flag.replace("[no-]", "")


_ENUM = re.compile(r"must be one of:?\s*((?:[\w.-]+(?:,\s*|\s+or\s+|\s*$|\.\s))+)", re.I)


def _enum(description: str) -> tuple[str, ...]:
    m = _ENUM.search(description)
    if m:
        vals = re.split(r",\s*|\s+or\s+", m.group(1).strip().rstrip("."))
        return tuple(v for v in (x.strip().rstrip(".") for x in vals) if v)
    m = re.search(r"one of the following:\s*\n\n((?:\u2014 \S+\s*\n*)+)", description)
    if m:
        return tuple(x.strip() for x in re.findall(r"\u2014 (\S+)", m.group(1)))
    return ()


def page_to_tool(page: ManPage, *, license: str = "Apache-2.0") -> Tool:
    """A catalogue record for a parsed command page."""
    syn = parse_synopsis(page.synopsis_fonts) if page.synopsis_fonts else SynopsisArgs()
    params: list[Parameter] = []
    seen: set[str] = set()
    pos_desc = {}
    flag_items: dict[str, Item] = {}
    for it in page.items:
        m = _FLAG.match(it.term)
        if m:
            flag_items.setdefault(_canonical(m.group(1)), it)
        elif it.section == "POSITIONAL ARGUMENTS":
            word = it.term.strip("[]").split()[0] if it.term.strip("[]").split() else ""
            pos_desc.setdefault(word.strip("[]"), it)
    for p in syn.positionals:
        it = pos_desc.get(p.name)
        params.append(Parameter(p.name, type="array" if p.repeated else "string", required=p.name in syn.required,
                                description=it.description if it else "", kind="positional",
                                repeated=p.repeated, metavar=p.name))
        seen.add(p.name)
    for p_name, it in pos_desc.items():  # documented but missing from the synopsis
        if p_name and p_name not in seen and re.fullmatch(r"[A-Z][A-Z0-9_.-]*", p_name):
            params.append(Parameter(p_name, description=it.description, kind="positional", metavar=p_name))
            seen.add(p_name)
    names = list(dict.fromkeys([*syn.flags, *flag_items]))
    by_no = {n[5:]: n for n in names if n.startswith("--no-")}  # "--no-x" in the synopsis, "--x" in FLAGS
    for n in names:
        if n.startswith("--no-") and "--" + n[5:] in names:
            continue  # documented under its positive name
        it = flag_items.get(n)
        s = syn.flags.get(n)
        term = it.term if it else (s.name if s else n)
        metavar = s.metavar if s else ""
        if it and not metavar:
            m = re.match(r"^\S+?=(\S.*)$", term.split(",")[0])
            metavar = m.group(1).strip() if m else ""
        aliases = list(s.aliases if s else [])
        if it:
            aliases += [a for a in re.findall(r",\s*(-[A-Za-z0-9])\b", term) if a not in aliases]
        raw = (s.name if s else "") + " " + term
        if "[no-]" in raw:
            aliases.append("--no-" + n[2:])
        elif n[2:] in by_no and by_no[n[2:]] != n:
            aliases.append(by_no[n[2:]])
        desc = it.description if it else ""
        ftype = "boolean" if not metavar else ("array" if "," in metavar else "string")
        params.append(Parameter(n, type=ftype, required=n in syn.required, enum=_enum(desc), description=desc,
                                kind="flag", aliases=tuple(dict.fromkeys(aliases)), metavar=metavar))
    wide = re.findall(r"--[a-z][a-z0-9-]*", page.sections.get("GCLOUD WIDE FLAGS", ""))
    track = page.name.split()[1] if len(page.name.split()) > 1 and page.name.split()[1] in ("alpha", "beta") \
        else "ga"
    meta = {"track": track, "global_flags": sorted(set(wide)),
            "is_group": "COMMANDS" in page.sections or "GROUPS" in page.sections}
    return Tool(name=page.name, description=page.sections.get("DESCRIPTION", ""), parameters=tuple(params),
                examples=tuple(page.examples), source=page.source, license=license, kind="cli",
                summary=page.summary, usage=page.synopsis.replace(" [GCLOUD_WIDE_FLAG ...]", ""),
                one_of_required=tuple(syn.one_of_required), meta=meta)


TRACKS = ("ga", "beta", "alpha")  # gcloud release tracks


def ingest_manpages(paths, *, tracks: tuple[str, ...] = ("ga",), include_groups: bool = False,
                    license: str = "Apache-2.0", progress: bool = False) -> list[Tool]:
    """Catalogue records for man page files (or folders: every ``*.1`` / ``*.1.gz`` inside).

    ``tracks`` keeps gcloud release tracks ("ga", "beta", "alpha"); command groups (pages with a
    COMMANDS or GROUPS section) are skipped unless ``include_groups``.
    """
    if not tracks or set(tracks) - set(TRACKS):
        raise ConfigError(f"unknown release track(s) {', '.join(sorted(set(tracks) - set(TRACKS))) or '(none)'}: "
                          f"choose from {', '.join(TRACKS)}")
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if re.search(r"\.\d\w*(\.gz)?$", x.name))
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(p.parent.glob(p.name)) if p.parent.is_dir() else []
            if not matches:
                raise DataError(f"{p} matches no man page file")
            files += matches
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="man pages", unit="page")
    tools = []
    for f in it:
        m = re.match(r"^[a-z0-9-]+_(alpha|beta)_", f.name)
        if m and m.group(1) not in tracks:  # cheap pre-filter by file name; the NAME line decides below
            continue
        try:
            text = _read(f)
        except DataError as e:  # a damaged page costs that page, with a warning, not the whole reference
            log.warning("%s: skipped", e)
            continue
        try:
            page = parse_manpage(text, source=str(f))
        except DataError:  # not a man(7) page
            continue
        if not page.name:
            continue
        tool = page_to_tool(page, license=license)
        if tool.meta["track"] not in tracks or (tool.meta["is_group"] and not include_groups):
            continue
        tools.append(tool)
    return tools


def manpage_catalog(man: str | Path, *, catalog: str | Path | None = None):
    """The catalogue at ``catalog`` if given, else the man pages under ``man`` ingested (nothing left on disk).

    What the tool-use recipes start from; pass ``catalog`` to reuse an `lmlab tools ingest` folder.
    """
    import tempfile

    from lmlab.tools.catalog import load_catalog, save_catalog

    if catalog:
        return load_catalog(catalog)
    with tempfile.TemporaryDirectory(prefix="lmlab-gcloud-") as tmp:  # removed once written: kept in memory
        return save_catalog(ingest_manpages([man]), Path(tmp) / "catalog",
                            info={"source": "manpages", "inputs": [str(man)]})
