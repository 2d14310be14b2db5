"""Catalogue records from Google API discovery documents (one :class:`Tool` per REST method).

The discovery format (https://developers.google.com/discovery/v1/reference/apis) nests ``resources``
that hold ``methods``; each method has an ``id`` ("compute.instances.insert"), ``httpMethod``,
``path``, ``description``, typed ``parameters`` (``location`` path/query, ``required``, ``enum``),
a ``request`` body schema reference and a ``response`` schema reference. ``google-api-python-client``
ships ~600 of these documents (``googleapiclient/discovery_cache/documents``), which
:func:`default_discovery_dir` finds.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import DataError, MissingDependencyError
from lmlab.tools.catalog import Parameter, Tool

LICENSE = "Apache-2.0"  # google-api-python-client's licence, which ships the documents


def default_discovery_dir() -> Path:
    """The discovery documents bundled with google-api-python-client."""
    import importlib.util

    spec = importlib.util.find_spec("googleapiclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("google-api-python-client", "pip install google-api-python-client")
    return Path(spec.submodule_search_locations[0]) / "discovery_cache" / "documents"


def _methods(node: dict, trail: tuple[str, ...] = ()):
    for name, m in sorted((node.get("methods") or {}).items()):
        yield trail + (name,), m
    for name, r in sorted((node.get("resources") or {}).items()):
        yield from _methods(r, trail + (name,))


def _param(name: str, p: dict) -> Parameter:
    enum = tuple(str(x) for x in p.get("enum", ()))
    ptype = "array" if p.get("repeated") else p.get("type", "string")
    return Parameter(name, type=ptype, required=bool(p.get("required")), enum=enum,
                     description=" ".join(str(p.get("description", "")).split()), kind=p.get("location", "query"))


def discovery_tools(doc: dict, *, source: str = "") -> list[Tool]:
    """One tool per method of a parsed discovery document."""
    if "resources" not in doc and "methods" not in doc:
        raise DataError(f"{source or 'document'} is not a discovery document (no resources or methods)")
    base = doc.get("rootUrl", "") + doc.get("servicePath", "")
    # API-wide parameters (alt, fields, key, ...) are left out of every method, unless the method declares a
    # parameter of that name of its own (recaptchaenterprise ...retrieveLegacySecretKey's required path
    # parameter "key", not the API key): only an exact repeat of the API-wide definition is dropped
    common = doc.get("parameters") or {}
    tools = []
    for trail, m in _methods(doc):
        name = m.get("id") or ".".join((doc.get("name", "api"), *trail))
        params = [_param(n, p) for n, p in (m.get("parameters") or {}).items() if common.get(n) != p]
        order = {n: i for i, n in enumerate(m.get("parameterOrder", ()))}
        params.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
        if m.get("request"):
            ref = m["request"].get("$ref", "object")
            params.append(Parameter("body", type="object", required=True, description=f"request body: {ref}",
                                    kind="body"))
        desc = " ".join(str(m.get("description", "")).split())
        summary = desc.split(". ")[0].rstrip(".") if desc else ""
        tools.append(Tool(name=name, description=desc, parameters=tuple(params),
                          returns=(m.get("response") or {}).get("$ref", ""), source=source, license=LICENSE,
                          kind="rest", summary=summary, usage=f"{m.get('httpMethod', 'GET')} {base}{m.get('path', '')}",
                          meta={"api": doc.get("name", ""), "version": doc.get("version", ""),
                                "title": doc.get("title", ""), "scopes": m.get("scopes", [])}))
    return tools


def ingest_discovery(paths=None, *, progress: bool = False) -> list[Tool]:
    """Tools from discovery documents: files, folders of ``*.json``, or (None) the bundled ones."""
    paths = [default_discovery_dir()] if paths is None else [paths] if isinstance(paths, (str, Path)) else paths
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # index.json lists the APIs; stable versions first so a method id shared with alpha/beta keeps v1's record
            files += sorted((x for x in p.glob("*.json") if x.name != "index.json"),
                            key=lambda x: ("alpha" in x.name or "beta" in x.name, x.name))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist")
    if progress:
        from tqdm import tqdm

        files = tqdm(files, desc="discovery documents", unit="doc")
    tools: dict[str, Tool] = {}
    for f in files:
        try:
            doc = json.loads(Path(f).read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None
        for t in discovery_tools(doc, source=str(f)):
            tools.setdefault(t.name, t)  # the same method id in two documents: keep the first (sorted) one
    return list(tools.values())
