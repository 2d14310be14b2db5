"""Catalogue records from OpenAPI 3 specifications (one :class:`Tool` per operation).

Reads ``paths -> {method: operation}`` (https://spec.openapis.org/oas/v3.1.0#paths-object): the tool
name is the ``operationId`` (else "METHOD /path"), its description the ``summary`` and
``description``, its parameters the path-level and operation-level ``parameters`` (``$ref`` s into
``components`` resolved) plus a ``body`` parameter for a ``requestBody``; ``returns`` is the first
2xx response's description. JSON always; YAML when PyYAML is installed. Not handled: callbacks,
links, external ``$ref`` s (another file), OpenAPI 2 (Swagger) documents.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import DataError, MissingDependencyError
from lmlab.tools.catalog import Parameter, Tool

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _resolve(spec: dict, obj):
    """Follow a local ``#/components/...`` reference (repeatedly)."""
    seen = 0
    while isinstance(obj, dict) and "$ref" in obj and seen < 16:
        ref = obj["$ref"]
        if not ref.startswith("#/"):
            raise DataError(f"external $ref {ref!r} is not supported: bundle the spec into one file first")
        node = spec
        for part in ref[2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
        obj, seen = node, seen + 1
    return obj


def _object(obj, what: str) -> dict:
    """``obj`` if it is a JSON object, else a DataError naming where in the spec it is."""
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise DataError(f"{what} must be an object, not {kind}: the spec is malformed")
    return obj


def _license(info: dict) -> str:
    """The spec's licence: ``license.identifier`` (SPDX, OpenAPI 3.1) or ``license.name``; a bare string
    (not allowed by the spec, but common) is taken as the name."""
    lic = info.get("license")
    if isinstance(lic, str):
        return lic
    return str(lic.get("identifier") or lic.get("name") or "") if isinstance(lic, dict) else ""


def _param(spec: dict, p: dict, where: str) -> Parameter:
    p = _object(_resolve(spec, p), f"a parameter of {where}")
    schema = _resolve(spec, p.get("schema") or {})
    schema = schema if isinstance(schema, dict) else {}
    return Parameter(p.get("name", ""), type=schema.get("type", "string"), required=bool(p.get("required")),
                     enum=tuple(str(x) for x in schema.get("enum", ())),
                     description=" ".join(str(p.get("description", "")).split()), kind=p.get("in", "query"))


def openapi_tools(spec: dict, *, source: str = "", license: str = "") -> list[Tool]:
    """One tool per operation of a parsed OpenAPI 3 document."""
    doc = source or "document"
    if not isinstance(spec, dict):
        raise DataError(f"{doc} is not an OpenAPI 3 document (a {type(spec).__name__}, not an object)")
    version = str(spec.get("openapi", ""))
    if not version.startswith("3"):
        raise DataError(f"{doc} is not an OpenAPI 3 document (openapi: {version or 'missing'})")
    info = _object(spec.get("info") or {}, f"{doc}: info")
    license = license or _license(info)
    servers = spec.get("servers") or [{}]
    server = str(servers[0].get("url", "")) if isinstance(servers, list) and isinstance(servers[0], dict) else ""
    tools = []
    for path, item in _object(spec.get("paths") or {}, f"{doc}: paths").items():
        item = _object(_resolve(spec, item), f"{doc}: path item {path!r}")
        shared = item.get("parameters") or []
        for method in METHODS:
            op = item.get(method)
            if not op:
                continue
            where = f"{doc}: {method.upper()} {path}"
            op = _object(op, where)
            params: dict[tuple[str, str], Parameter] = {}
            for raw in [*shared, *(op.get("parameters") or [])]:  # operation-level overrides path-level
                p = _param(spec, raw, where)
                params[(p.name, p.kind)] = p
            plist = list(params.values())
            body = _object(_resolve(spec, op.get("requestBody") or {}), f"{where}: requestBody")
            if body:
                content = body.get("content") or {}
                media = next(iter(content), "")
                schema = (content.get(media) or {}).get("schema") or {}
                ref = schema.get("$ref", "").rsplit("/", 1)[-1] or schema.get("type", "object")
                plist.append(Parameter("body", type="object", required=bool(body.get("required")),
                                       description=" ".join(f"{body.get('description', '')} ({media}: {ref})".split()),
                                       kind="body"))
            responses = _object(op.get("responses") or {}, f"{where}: responses")
            ok = next((c for c in sorted(map(str, responses)) if c.startswith("2")), None)
            returns = str(_resolve(spec, responses.get(ok) or responses.get(int(ok) if ok else -1) or {}).get(
                "description", "")) if ok else ""
            summary = " ".join(str(op.get("summary", "")).split())
            desc = " ".join(str(op.get("description", "")).split()) or summary
            tools.append(Tool(name=op.get("operationId") or f"{method.upper()} {path}", description=desc,
                              parameters=tuple(plist), returns=returns, source=source, license=license,
                              kind="rest", summary=summary, usage=f"{method.upper()} {server}{path}",
                              meta={"api": info.get("title", ""), "version": info.get("version", ""),
                                    "tags": op.get("tags", [])}))
    return tools


def _load(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MissingDependencyError("PyYAML (to read YAML specs)", "pip install pyyaml") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(f"{path} is not valid YAML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def ingest_openapi(paths, *, license: str = "") -> list[Tool]:
    """Tools from OpenAPI 3 files or folders (``*.json``, ``*.yaml``, ``*.yml``)."""
    files: list[Path] = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_dir():
            files += sorted(x for x in p.rglob("*") if x.suffix in (".json", ".yaml", ".yml"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist")
    tools: dict[str, Tool] = {}
    for f in files:
        for t in openapi_tools(_load(f), source=str(f), license=license):
            if t.name in tools:
                raise DataError(f"operation {t.name!r} appears twice ({tools[t.name].source}, {f}): "
                                f"ingest the specs separately")
            tools[t.name] = t
    return list(tools.values())
