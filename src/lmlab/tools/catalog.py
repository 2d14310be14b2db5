"""API catalogues: one record type for a callable tool, stored as a folder with a manifest.

A :class:`Tool` describes anything an agent can call: a REST method from a Google discovery
document (:mod:`lmlab.tools.discovery`), an OpenAPI 3 operation (:mod:`lmlab.tools.openapi`) or a
command-line command from its man page (:mod:`lmlab.tools.manpages`). It carries a name, a
description, typed :class:`Parameter` s (name, type, required, enum, description), what it returns,
documented :class:`Example` s (a natural-language request and the exact call), its source and licence.

A catalogue on disk is a folder with ``tools.jsonl`` (one record per line, sorted by name) and
``manifest.json`` (how it was built, counts, checksums); :func:`load_catalog` reads it back and
refuses a folder whose files do not match their checksums.

The record follows ToolBench's API entries (Qin et al. 2023, arXiv 2307.16789: name, description,
required/optional parameters with type and description) and adds what a CLI needs: parameter kind
(flag or positional), aliases, a repeated marker, and groups of which one must be given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmlab.errors import DataError
from lmlab.io import atomic_dir, check_sizes, existing_artefact, read_manifest, write_manifest

RECORDS = "tools.jsonl"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Parameter:
    """One argument of a tool."""

    name: str  # "--zone" for a CLI flag, "INSTANCE_NAMES" for a positional, "project" for a REST parameter
    type: str = "string"  # "string", "integer", "number", "boolean", "array", "object"
    required: bool = False
    enum: tuple[str, ...] = ()
    description: str = ""
    kind: str = "flag"  # "flag" | "positional" (CLI); "path" | "query" | "header" | "body" (HTTP)
    aliases: tuple[str, ...] = ()  # e.g. ("-z",) or ("--no-async",) for a negatable boolean flag
    repeated: bool = False  # a positional that takes several values ("NAME [NAME ...]")
    metavar: str = ""  # the value's placeholder in the synopsis ("ZONE"); empty for boolean flags


@dataclass(frozen=True)
class Example:
    """A documented use: a natural-language request and the exact call that fulfils it."""

    request: str
    call: str


@dataclass(frozen=True)
class Tool:
    """A callable tool (REST method, CLI command) with its documentation."""

    name: str  # unique within a catalogue: "gcloud compute instances create", "compute.instances.insert"
    description: str
    parameters: tuple[Parameter, ...] = ()
    returns: str = ""
    examples: tuple[Example, ...] = ()
    source: str = ""  # where the record came from (a file path, an URL)
    license: str = ""  # SPDX identifier of the documentation's licence
    kind: str = "cli"  # "cli" | "rest"
    summary: str = ""  # one line (a man page's NAME line, a method's first sentence)
    usage: str = ""  # the synopsis / HTTP line ("gcloud compute instances create NAME [--zone=ZONE]")
    one_of_required: tuple[tuple[str, ...], ...] = ()  # groups of parameter names of which one must be given
    meta: dict = field(default_factory=dict, compare=False)

    def parameter(self, name: str) -> Parameter | None:
        """The parameter called ``name`` or having it as an alias; None if there is none."""
        for p in self.parameters:
            if p.name == name or name in p.aliases:
                return p
        return None

    @property
    def required(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.required)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Tool:
        d = dict(d)
        d["parameters"] = tuple(Parameter(**{**p, "enum": tuple(p.get("enum", ())),
                                             "aliases": tuple(p.get("aliases", ()))})
                                for p in d.get("parameters", ()))
        d["examples"] = tuple(Example(**e) for e in d.get("examples", ()))
        d["one_of_required"] = tuple(tuple(g) for g in d.get("one_of_required", ()))
        return cls(**d)

    def render(self, *, max_flags: int | None = None) -> str:
        """A human-readable page: name, summary, usage, description, parameters, examples."""
        lines = [self.name + (f" - {self.summary}" if self.summary else "")]
        if self.usage:
            lines += ["", "USAGE", "  " + self.usage]
        if self.description:
            lines += ["", "DESCRIPTION", *("  " + x for x in self.description.splitlines())]
        params = self.parameters if max_flags is None else self.parameters[:max_flags]
        if params:
            lines += ["", "PARAMETERS"]
            for p in params:
                head = p.name + (f"={p.metavar}" if p.metavar and p.kind == "flag" else "") + (
                    " (required)" if p.required else "")
                if p.aliases:
                    head += "  [" + ", ".join(p.aliases) + "]"
                lines.append("  " + head)
                if p.enum:
                    lines.append("      one of: " + ", ".join(p.enum))
                if p.description:
                    lines.append("      " + p.description.replace("\n", " "))
        if self.examples:
            lines += ["", "EXAMPLES"]
            for e in self.examples:
                lines += ["  " + e.request, "    " + e.call]
        return "\n".join(lines)


class Catalog:
    """An ordered collection of tools, looked up by name."""

    def __init__(self, tools: Iterable[Tool], *, manifest: dict | None = None):
        self.tools: list[Tool] = sorted(tools, key=lambda t: t.name)
        self._by_name: dict[str, Tool] = {}
        for t in self.tools:
            if t.name in self._by_name:
                raise DataError(f"two tools are called {t.name!r}: names must be unique in a catalogue")
            self._by_name[t.name] = t
        self.manifest = manifest or {}

    def __len__(self) -> int:
        return len(self.tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Tool:
        try:
            return self._by_name[name]
        except KeyError:
            close = [n for n in self._by_name if name.lower() in n.lower()][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise DataError(f"no tool called {name!r} in the catalogue{hint}") from None

    def get(self, name: str) -> Tool | None:
        return self._by_name.get(name)

    def index(self, name: str) -> int:
        """Position of ``name`` in :attr:`tools` (retrievers return these positions)."""
        if not hasattr(self, "_pos"):
            self._pos = {t.name: i for i, t in enumerate(self.tools)}
        return self._pos[name]


def record_line(tool: Tool) -> str:
    """A tool's line in ``tools.jsonl`` (ASCII JSON, sorted keys)."""
    return json.dumps(tool.to_json(), sort_keys=True) + "\n"


def save_catalog(tools: Iterable[Tool], out: str | Path, *, info: dict) -> Catalog:
    """Write a catalogue folder (``tools.jsonl`` + ``manifest.json``) atomically and return it; an existing
    ``out`` is replaced only if it is an earlier catalogue (or empty)."""
    catalog = Catalog(tools)
    if not catalog.tools:
        raise DataError(f"nothing to write to {out}: the ingester found no tools (check the input path)")
    existing_artefact(out, "tool-catalog", what="tool catalogue")  # refuse to replace another folder
    with atomic_dir(out) as tmp:
        with open(tmp / RECORDS, "w") as f:
            for t in catalog.tools:
                f.write(record_line(t))
        manifest = write_manifest(tmp, {"kind": "tool-catalog", "format_version": FORMAT_VERSION,
                                        "n_tools": len(catalog),
                                        "n_examples": sum(len(t.examples) for t in catalog), **info})
    catalog.manifest = manifest
    return catalog


def load_catalog(folder: str | Path, *, verify: bool = True) -> Catalog:
    """Read a catalogue folder written by :func:`save_catalog` (checksums verified by default)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no tool catalogue at {folder}: build one with `lmlab tools ingest ... --out {folder}`")
    manifest = read_manifest(folder, verify=verify)
    if manifest.get("kind") != "tool-catalog":
        raise DataError(f"{folder} is not a tool catalogue (manifest kind {manifest.get('kind')!r}); "
                        f"build one with `lmlab tools ingest`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{folder} has catalogue format {manifest.get('format_version')}, this lmlab reads "
                        f"{FORMAT_VERSION}: re-run `lmlab tools ingest`")
    return Catalog(_read_records(folder, manifest), manifest=manifest)


def _read_records(folder: Path, manifest: dict) -> list[Tool]:
    """The tools of ``tools.jsonl``; a missing, truncated or garbled file is a DataError even without
    ``verify`` (the CLI skips the checksum): its size is checked against the manifest's record of it."""
    damaged = DataError(f"{folder}: {RECORDS} is missing or corrupted: re-run `lmlab tools ingest`")
    try:
        check_sizes(folder, manifest, only=[RECORDS])
        with open(folder / RECORDS, encoding="utf-8") as f:
            return [Tool.from_json(json.loads(line)) for line in f if line.strip()]
    except (DataError, OSError, ValueError, TypeError, AttributeError):  # decode errors (JSON, UTF-8) are ValueErrors
        raise damaged from None
