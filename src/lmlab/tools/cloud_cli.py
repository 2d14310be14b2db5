"""The cloud-CLI benchmark: (request, gold command) pairs from gcloud's EXAMPLES, a structural comparator, a validator.

Hsieh et al. 2023, "Tool Documentation Enables Zero-Shot Tool-Usage with Large Language Models"
(arXiv 2308.00675) built a benchmark, LLM-Cloud CLI, from Google Cloud's gcloud documentation (no
official code or data release). This module rebuilds one from the gcloud man pages installed with
Debian's ``google-cloud-cli``:

- :func:`build_benchmark`: every EXAMPLES pair of a command page (a request paragraph followed by one
  ``$ gcloud ...`` command, parsed by :mod:`lmlab.tools.manpages`) whose command calls that page's own
  command, has no shell operators (pipes, ``&&``, ``$(...)``, redirections) and parses with ``shlex``.
  Pairs are split by command group (the command path without its last word, e.g. "gcloud compute
  instances"): a group's hash decides its split, so every test command is unseen in train.
- :func:`parse_command` / :func:`compare`: commands compared structurally: command path (longest
  prefix naming a catalogue command), positionals, and flags with values (``--flag=value`` equals
  ``--flag value``; order irrelevant; short aliases mapped to their long names; ``_`` equals ``-`` in
  flag names). Placeholders in the gold command (``example-instance``, ``my-bucket``, ``<name>``, ``$VAR``,
  and upper-case words the documentation uses as names, :func:`is_placeholder`; also as parts of a value
  such as ``projects/PROJECT_ID/...``) match any value, unless the request spells them out, in which case
  they must be reproduced. An upper-case word that is not documented as a name (``GITHUB``, ``BACKUP``,
  ``UTC``) is a literal. Reported: command-path accuracy, flag-name F1, flag name+value F1, and exact match.
- :func:`validate`: a predicted command against its command's documentation (unknown command, unknown
  flag, value outside a documented enum, a value given to a boolean flag, missing required flag or
  positional, none of a required group, too many positionals); the messages are usable as feedback.

Deviations from the paper: the paper's benchmark has 200 commands with curated requests; ours uses
every documented example of the GA (non-alpha/beta) commands, so requests are the documentation's own
lead-in sentences ("To create an instance called ..., run:" -> "Create an instance called ...").
"""

from __future__ import annotations

import difflib
import hashlib
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field

from lmlab.errors import DataError
from lmlab.tools.catalog import Catalog, Tool

PROGRAM = "gcloud"
# gcloud-wide flags that take no value (all others take one); short forms
GLOBAL_BOOLEAN = {"--quiet", "--help", "--log-http", "--no-user-output-enabled", "--user-output-enabled"}
GLOBAL_SHORT = {"-q": "--quiet", "-h": "--help"}
GLOBAL_FLAGS = {"--access-token-file", "--account", "--billing-project", "--configuration", "--flags-file",
                "--flatten", "--format", "--help", "--impersonate-service-account", "--log-http", "--project",
                "--quiet", "--trace-token", "--user-output-enabled", "--no-user-output-enabled", "--verbosity"}
# metavars of the value-taking gcloud-wide flags, as gcloud(1) documents them
GLOBAL_METAVARS = {"--access-token-file": "ACCESS_TOKEN_FILE", "--account": "ACCOUNT",
                   "--billing-project": "BILLING_PROJECT", "--configuration": "CONFIGURATION",
                   "--flags-file": "YAML_FILE", "--flatten": "[KEY,...]", "--format": "FORMAT",
                   "--impersonate-service-account": "SERVICE_ACCOUNT_EMAILS", "--project": "PROJECT_ID",
                   "--trace-token": "TRACE_TOKEN", "--verbosity": "VERBOSITY"}
_SHELL_OPS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>", "2>&1"}
# placeholders by form alone: my-bucket, example-instance, <name>, $VAR / ${VAR}, [PROJECT_ID]
_PLACEHOLDER_FORM = re.compile(r"(?:my|example|your|some|sample|test)[-_][\w.-]*|<[^<>]+>|"
                               r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\[[A-Z_]+\]")
_CAPS_WORD = re.compile(r"[A-Z][A-Z0-9]*(?:[_-][A-Z0-9]+)+|[A-Z]{3,}[0-9]*")  # INSTANCE_NAME, ZONE, KEY1
_NAME_WORDS = re.compile(r"[A-Z][A-Z0-9]*(?:[_-][A-Z0-9]+)*")  # the words of a metavar ("[KEY=VALUE,...]")
# Words that make an upper-case word a name whatever the command: each occurs in gcloud's metavars and in
# none of the catalogue's documented enum constants (4,621 GA pages: NAME is part of 159 distinct metavars,
# ID 140, FILE 141, LOCATION 64, ... and of 0 of the 301 upper-case enum values). PROJECT and KEY are left
# out on purpose: enum constants use them (PROJECT, PARTITION_KEY_UNSPECIFIED), and so do gold commands
# (``--request_scope_max_width_preference=PROJECT``); PROJECT_ID, KEY_RING_ID etc. still count through ID.
_NAME_TOKENS = frozenset({"NAME", "NAMES", "ID", "IDS", "NUM", "NUMBER", "ZONE", "REGION", "LOCATION", "ACCOUNT",
                          "EMAIL", "FILE", "DIR", "URI", "URL", "KEYRING", "VALUE", "VAL", "ARG"})
_SEGMENTS = re.compile(r"[^/,=:@]+|[/,=:@]")


# -- parsing ------------------------------------------------------------------------------------------

def join_continuations(text: str) -> str:
    """One line from a documented command: ``\\`` + newline + indent -> a space; without indent -> nothing."""
    text = re.sub(r"([ \t]*)\\\n([ \t]*)", lambda m: " " if m.group(1) or m.group(2) else "", text.strip())
    return text.replace("\n", "")


@dataclass(frozen=True)
class ParsedCommand:
    """A command line split into path, positionals and flags."""

    path: tuple[str, ...]  # ("gcloud", "compute", "instances", "create")
    positionals: tuple[str, ...]
    flags: dict[str, tuple[str | None, ...]] = field(default_factory=dict)  # name -> values (None: no value)
    known: bool = False  # the path names a catalogue command

    @property
    def name(self) -> str:
        return " ".join(self.path)


def tokenize(command: str) -> list[str]:
    """shlex tokens of a (possibly multi-line, ``$``-prefixed) command; DataError on unbalanced quotes."""
    text = join_continuations(command).strip()
    text = text.removeprefix("$ ").strip()
    try:
        return shlex.split(text)
    except ValueError as e:
        raise DataError(f"cannot parse command {text[:80]!r}: {e}") from None


def _resolve_path(tokens: list[str], catalog: Catalog | None) -> tuple[int, Tool | None]:
    """Number of leading tokens forming the command path, and the tool they name (longest match)."""
    words = []
    for t in tokens:
        if t.startswith("-"):
            break
        words.append(t)
    if catalog is not None:
        for n in range(len(words), 0, -1):
            tool = catalog.get(" ".join(words[:n]))
            if tool is not None:
                return n, tool
    return len(words), None  # unknown command: every leading word is path


def _norm(name: str) -> str:
    """``--flag_name`` -> ``--flag-name`` (gcloud accepts both spellings)."""
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def flag_table(tool: Tool) -> dict[str, object]:
    """Every spelling of the tool's flags (normalised names and aliases) -> its Parameter."""
    table: dict[str, object] = {}
    for p in tool.parameters:
        if p.kind == "flag":
            table[_norm(p.name)] = p
            for a in p.aliases:
                table[_norm(a)] = p
    return table


def _flag_name(raw: str, table: dict) -> str:
    """Canonical flag name: global short forms and a tool's short aliases -> long names; ``_`` -> ``-``."""
    name = _norm(GLOBAL_SHORT.get(raw, raw))
    if not name.startswith("--"):
        p = table.get(name)
        if p is not None:
            name = _norm(p.name)
    return name


def _takes_value(name: str, table: dict | None) -> bool | None:
    """Whether a flag takes a value: True/False from the documentation, None when unknown."""
    if name in GLOBAL_BOOLEAN:
        return False
    if name in GLOBAL_FLAGS:
        return True
    p = (table or {}).get(name)
    if p is None:
        return None
    return p.type != "boolean"


def parse_command(command: str, catalog: Catalog | None = None) -> ParsedCommand:
    """Split a command into path / positionals / flags, using the catalogue to find the path and boolean flags."""
    tokens = tokenize(command)
    if not tokens:
        raise DataError("empty command")
    n, tool = _resolve_path(tokens, catalog)
    path, rest = tuple(tokens[:n]), tokens[n:]
    table = flag_table(tool) if tool is not None else {}
    positionals: list[str] = []
    flags: dict[str, list[str | None]] = {}
    i = 0
    only_positionals = False
    while i < len(rest):
        t = rest[i]
        i += 1
        if only_positionals or not t.startswith("-") or t == "-" or re.fullmatch(r"-\d+(\.\d+)?", t):
            positionals.append(t)
            continue
        if t == "--":
            only_positionals = True
            continue
        raw, eq, value = t.partition("=")
        name = _flag_name(raw, table)
        if not eq:
            takes = _takes_value(name, table)
            nxt = rest[i] if i < len(rest) else None
            if takes is True and nxt is not None:
                value, i = nxt, i + 1
            elif takes is None and nxt is not None and not nxt.startswith("-"):
                value, i = nxt, i + 1  # undocumented flag: assume "--flag value"
            else:
                value = None
        flags.setdefault(name, []).append(value)
    return ParsedCommand(path, tuple(positionals), {k: tuple(v) for k, v in flags.items()}, known=tool is not None)


# -- comparison --------------------------------------------------------------------------------------

def metavar_names(*metavars: str) -> frozenset[str]:
    """The upper-case words of metavars and positional names (``"[KEY=VALUE,...]"`` -> KEY, VALUE)."""
    return frozenset(w for m in metavars for w in _NAME_WORDS.findall(m))


def documented_names(tool: Tool) -> frozenset[str]:
    """Every name the command's documentation gives a value: its positionals and all its flags' metavars."""
    return metavar_names(*(p.metavar for p in tool.parameters),
                         *(p.name for p in tool.parameters if p.kind == "positional"))


def is_placeholder(part: str, names: frozenset[str] = frozenset()) -> bool:
    """Whether a part of a gold value stands for a value to fill in rather than a literal.

    Placeholders by form (``_PLACEHOLDER_FORM``), and upper-case words that are a documented name
    (``names``: the metavar of the flag the value belongs to, or the command's positional names), a
    numbered one (``KEY1`` for ``KEY``), start with MY/YOUR/EXAMPLE, or contain a name word
    (``_NAME_TOKENS``: ``INSTANCE_NAME``, ``PROJECT_ID``, ``KMS_LOCATION``). Other upper-case words
    (``GITHUB``, ``BACKUP``, ``ACTIVE``, ``UTC``) are constants: a wrong one must not score as a match.
    """
    if _PLACEHOLDER_FORM.fullmatch(part):
        return True
    if not _CAPS_WORD.fullmatch(part):
        return False
    if part in names or part.rstrip("0123456789") in names:
        return True
    words = [w.rstrip("0123456789") for w in re.split(r"[_-]", part)]
    return words[0] in ("MY", "YOUR", "EXAMPLE") or any(w in _NAME_TOKENS for w in words)


def _pattern(value: str, request: str, literals: frozenset[str] = frozenset(),
             names: frozenset[str] = frozenset()) -> re.Pattern | None:
    """A regex for a gold value with placeholders as wildcards (None: compare literally).

    A part is a placeholder when :func:`is_placeholder` says so given the documented ``names``, the
    request does not spell it out, and it is not a documented enum value of the command (``literals``,
    upper-cased).
    """
    parts = _SEGMENTS.findall(value)
    wild = False
    out = []
    for part in parts:
        if is_placeholder(part, names) and part not in request and part.upper() not in literals:
            out.append(".+")
            wild = True
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.S) if wild else None


def value_matches(gold: str | None, pred: str | None, request: str = "",
                  literals: frozenset[str] = frozenset(), names: frozenset[str] = frozenset()) -> bool:
    """Equal values, or a prediction that fills the gold value's placeholders (module docstring)."""
    if gold is None or pred is None:
        return gold is None and pred is None
    g, p = gold.strip().rstrip("/"), pred.strip().rstrip("/")
    if g == p:
        return True
    pat = _pattern(g, request, literals, names)
    return bool(pat and pat.fullmatch(p))


def _value_names(value: str | None, own: frozenset[str], documented: frozenset[str]) -> frozenset[str]:
    """The names that are placeholders in one value: its own metavar's (or the positionals'), and in a
    resource path (``projects/SOURCE_PROJECT/instances/SOURCE_INSTANCE``) every name of the command,
    since constants do not appear there. A flag's value is not judged by another flag's metavar: in
    ``--type=BACKUP`` BACKUP is a constant even though the command has ``--backup=BACKUP``."""
    return own | documented if value and "/" in value else own


@dataclass(frozen=True)
class Comparison:
    """How a predicted command matches the gold one."""

    path_correct: bool
    positionals_correct: bool
    flag_precision: float
    flag_recall: float
    flag_f1: float  # over flag names
    flag_value_f1: float  # over (name, value) with placeholder matching
    exact: bool  # path, positionals and every flag value match
    parsed: bool = True  # the prediction parsed at all


def _f1(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    if n_pred == 0 and n_gold == 0:
        return 1.0, 1.0, 1.0
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def compare(gold: str | ParsedCommand, pred: str | ParsedCommand | None, *, catalog: Catalog | None = None,
            request: str = "") -> Comparison:
    """Compare a predicted command with the gold one (flag order irrelevant; placeholders normalised)."""
    g = gold if isinstance(gold, ParsedCommand) else parse_command(gold, catalog)
    try:
        p = pred if isinstance(pred, ParsedCommand) else parse_command(pred, catalog) if pred else None
    except DataError:
        p = None
    if p is None:
        return Comparison(False, False, 0.0, 0.0, 0.0, 0.0, False, parsed=False)
    path_ok = g.path == p.path
    tool = catalog.get(g.name) if catalog is not None else None
    lits = frozenset(e.upper() for q in tool.parameters for e in q.enum) if tool is not None else frozenset()
    documented = documented_names(tool) if tool is not None else frozenset()
    table = flag_table(tool) if tool is not None else {}
    positional = metavar_names(*(q.name for q in tool.parameters if q.kind == "positional")) if tool is not None \
        else frozenset()
    flag_names = {k: metavar_names(GLOBAL_METAVARS.get(k, ""), getattr(table.get(k), "metavar", ""))
                  for k in g.flags}
    pos_ok = len(g.positionals) == len(p.positionals) and all(
        value_matches(a, b, request, lits, _value_names(a, positional, documented))
        for a, b in zip(g.positionals, p.positionals, strict=True))
    names_g, names_p = set(g.flags), set(p.flags)
    fp, fr, ff = _f1(len(names_g & names_p), len(names_p), len(names_g))
    pairs_g = [(k, v) for k, vs in g.flags.items() for v in vs]
    pairs_p = [(k, v) for k, vs in p.flags.items() for v in vs]
    used = [False] * len(pairs_p)
    tp = 0
    for k, v in pairs_g:
        for j, (k2, v2) in enumerate(pairs_p):
            if not used[j] and k == k2 and value_matches(v, v2, request, lits,
                                                          _value_names(v, flag_names[k], documented)):
                used[j] = True
                tp += 1
                break
    _, _, fvf = _f1(tp, len(pairs_p), len(pairs_g))
    exact = path_ok and pos_ok and names_g == names_p and tp == len(pairs_g) == len(pairs_p)
    return Comparison(path_ok, pos_ok, fp, fr, ff, fvf, exact)


@dataclass(frozen=True)
class Scores:
    """Mean comparison metrics over a set of predictions."""

    n: int
    path_accuracy: float
    flag_f1: float
    flag_value_f1: float
    exact_match: float
    parse_rate: float
    valid_rate: float | None = None  # fraction passing :func:`validate`, when computed

    def to_json(self) -> dict:
        return dict(self.__dict__)


def aggregate(comparisons: list[Comparison], valid: list[bool] | None = None) -> Scores:
    n = len(comparisons)
    if n == 0:
        raise DataError("no predictions to score")

    def mean(xs):
        return float(sum(xs) / n)

    return Scores(n, mean(c.path_correct for c in comparisons), mean(c.flag_f1 for c in comparisons),
                  mean(c.flag_value_f1 for c in comparisons), mean(c.exact for c in comparisons),
                  mean(c.parsed for c in comparisons), (sum(valid) / len(valid)) if valid else None)


# -- validation --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Validation:
    """Whether a command agrees with its documentation; ``errors`` are one-line feedback messages."""

    ok: bool
    errors: tuple[str, ...]
    tool: str | None


def _enum_key(value: str) -> str:
    """gcloud takes an enum value in either spelling: ``RSA_4096`` is ``rsa-4096``."""
    return value.lower().replace("_", "-")


def _outside_enum(value: str, p) -> bool:
    """Whether a flag value names no documented enum value. A list flag's items are checked one by one;
    ``key=value`` items (the enum belongs to one key), empty items and placeholders (``--color=COLOR``)
    are not checked."""
    allowed = {_enum_key(e) for e in p.enum}
    names = metavar_names(p.metavar)
    items = value.split(",") if p.type == "array" else [value]
    return any(_enum_key(v) not in allowed and not is_placeholder(v, names)
               for v in items if v and not (p.type == "array" and "=" in v))


def validate(command: str, catalog: Catalog, *, program: str = PROGRAM) -> Validation:
    """Check a command against the documented flags and arguments of its command (module docstring)."""
    try:
        cmd = parse_command(command, catalog)
    except DataError as e:
        return Validation(False, (str(e),), None)
    if not cmd.path or cmd.path[0] != program:
        return Validation(False, (f"the command must start with `{program}`",), None)
    if not cmd.known:
        names = [t.name for t in catalog]
        close = difflib.get_close_matches(cmd.name, names, n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return Validation(False, (f"`{cmd.name}` is not a documented command{hint}",), None)
    tool = catalog[cmd.name]
    errors: list[str] = []
    known = flag_table(tool)
    global_flags = {_norm(f) for f in tool.meta.get("global_flags") or ()} | GLOBAL_FLAGS
    flag_names = [f for f in known if f.startswith("--")]
    for name, values in cmd.flags.items():
        p = known.get(name)
        if p is None:
            if name in global_flags:
                continue
            close = difflib.get_close_matches(name, flag_names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            errors.append(f"unknown flag {name} for `{tool.name}`{hint}")
            continue
        if p.type == "boolean" and any(v is not None for v in values):
            errors.append(f"{name} takes no value")
        if p.type != "boolean" and any(v is None for v in values):
            errors.append(f"{name} needs a value ({name}={p.metavar or 'VALUE'})")
        if p.enum:
            bad = [v for v in values if v is not None and _outside_enum(v, p)]
            errors += [f"{name}={v} is not one of {', '.join(p.enum)}" for v in bad]
    given = set(cmd.flags)
    for p in tool.parameters:
        if p.kind == "flag" and p.required and _norm(p.name) not in given and not ({_norm(a) for a in p.aliases}
                                                                                    & given):
            errors.append(f"missing required flag {p.name}={p.metavar or 'VALUE'}")
    for group in tool.one_of_required:
        flags = [_norm(g) for g in group if g.startswith("-")]
        positional = [g for g in group if not g.startswith("-")]
        if flags and not (given & set(flags)) and not (positional and cmd.positionals):
            errors.append(f"one of {', '.join(flags[:6])}{' ...' if len(flags) > 6 else ''} is required")
    pos = [p for p in tool.parameters if p.kind == "positional"]
    n_required = sum(p.required for p in pos)
    if len(cmd.positionals) < n_required:
        missing = [p.name for p in pos if p.required][len(cmd.positionals):]
        errors.append(f"missing positional argument {' '.join(missing)}")
    if not any(p.repeated for p in pos) and len(cmd.positionals) > len(pos):
        extra = cmd.positionals[len(pos):]
        errors.append(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(extra)} "
                      f"(`{tool.name}` takes {len(pos)} positional argument{'s' if len(pos) != 1 else ''})")
    return Validation(not errors, tuple(errors), tool.name)


# -- the benchmark ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CliExample:
    """One benchmark item: a request and the gold command that fulfils it."""

    id: str
    request: str
    command: str  # one line
    tool: str  # the command path, e.g. "gcloud compute instances create"
    group: str  # the command group deciding the split, e.g. "gcloud compute instances"
    split: str  # "train" | "val" | "test"


@dataclass(frozen=True)
class CliBenchmarkConfig:
    """How pairs are kept and split."""

    val_fraction: float = 0.1  # of command groups (not pairs)
    test_fraction: float = 0.1
    seed: int = 0  # salts the group hash
    min_request_words: int = 3  # drop lead-ins such as "Run:"
    program: str = PROGRAM


@dataclass
class CliBenchmark:
    """Pairs by split, plus counts of what was dropped and why."""

    examples: list[CliExample]
    config: CliBenchmarkConfig
    dropped: dict[str, int]

    def split(self, name: str) -> list[CliExample]:
        return [e for e in self.examples if e.split == name]

    def stats(self) -> dict:
        by = Counter(e.split for e in self.examples)
        tools = {s: len({e.tool for e in self.examples if e.split == s}) for s in ("train", "val", "test")}
        groups = {s: len({e.group for e in self.examples if e.split == s}) for s in ("train", "val", "test")}
        return {"pairs": dict(by), "commands": tools, "groups": groups, "dropped": dict(self.dropped),
                "total_pairs": len(self.examples)}


def command_group(tool_name: str) -> str:
    words = tool_name.split()
    return " ".join(words[:-1]) if len(words) > 2 else words[0] if words else ""


def _split_of(group: str, config: CliBenchmarkConfig) -> str:
    h = int(hashlib.sha256(f"{config.seed}:{group}".encode()).hexdigest()[:12], 16) / 16 ** 12
    if h < config.test_fraction:
        return "test"
    if h < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def build_benchmark(catalog: Catalog, config: CliBenchmarkConfig = CliBenchmarkConfig()) -> CliBenchmark:
    """(request, gold command) pairs from the catalogue's CLI examples, split by command group."""
    examples: list[CliExample] = []
    dropped: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    for tool in catalog:
        if tool.kind != "cli":
            continue
        for k, ex in enumerate(tool.examples):
            request = " ".join(ex.request.split())
            if len(request.split()) < config.min_request_words:
                dropped["short request"] += 1
                continue
            if "$(" in ex.call or "`" in ex.call:
                dropped["shell substitution"] += 1
                continue
            try:
                tokens = tokenize(ex.call)
            except DataError:
                dropped["unparsable"] += 1
                continue
            if any(t in _SHELL_OPS for t in tokens):
                dropped["shell operator"] += 1
                continue
            line = join_continuations(ex.call)
            n, named = _resolve_path(tokens, catalog)
            if named is None or named.name != tool.name:
                dropped["calls another command"] += 1
                continue
            if (request, line) in seen:
                dropped["duplicate"] += 1
                continue
            seen.add((request, line))
            group = command_group(tool.name)
            uid = hashlib.sha1(f"{tool.name}#{k}".encode()).hexdigest()[:10]
            examples.append(CliExample(uid, request, line, tool.name, group, _split_of(group, config)))
    if not examples:
        raise DataError("the catalogue has no usable CLI examples: ingest man pages with EXAMPLES sections")
    return CliBenchmark(examples, config, dict(dropped))


# -- model output -> command ---------------------------------------------------------------------------

def extract_command(text: str, *, program: str = PROGRAM) -> str | None:
    """The first ``program ...`` command in a model's output.

    Preference: a line that starts with the program (after code fences, ``$`` prompts and backticks are
    removed; ``\\`` continuation lines joined), then an inline ```program ...``` span, then the text from
    the first occurrence of ``program `` to the end of its line.
    """
    text = re.sub(r"```[a-z]*", "\n", text)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        s = line.strip().strip("`").strip().removeprefix("$ ").strip()
        if s != program and not s.startswith(program + " "):
            continue
        cmd = [s]
        k = i + 1
        while cmd[-1].endswith("\\") and k < len(lines):  # continuation lines
            cmd.append(lines[k].strip().strip("`"))
            k += 1
        return join_continuations("\n".join(cmd)).strip()
    m = re.search(r"`\$?\s*(" + re.escape(program) + r"(?: [^`\n]*)?)`", text)
    if m:
        return m.group(1).strip()
    m = re.search(r"(?:^|\s)(" + re.escape(program) + r" [^\n]*)", text)
    return m.group(1).strip() if m else None
