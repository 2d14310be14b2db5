import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmlab.errors import DataError
from lmlab.tools.catalog import Tool, load_catalog, save_catalog
from lmlab.tools.discovery import ingest_discovery
from lmlab.tools.manpages import ingest_manpages
from lmlab.tools.openapi import ingest_openapi

FIX = Path(__file__).parent / "fixtures"


def test_discovery_minimal():
    tools = {t.name: t for t in ingest_discovery(FIX / "discovery_minimal.json")}
    assert set(tools) == {"widgets.projects.widgets.insert", "widgets.projects.widgets.list"}
    ins = tools["widgets.projects.widgets.insert"]
    assert ins.usage == "POST https://widgets.example.com/v1/projects/{project}/widgets"
    assert [p.name for p in ins.parameters] == ["project", "color", "body"]  # API-wide "alt" left out
    assert ins.parameter("project").required and ins.parameter("project").kind == "path"
    assert ins.parameter("color").enum == ("RED", "BLUE") and ins.returns == "Operation"
    assert ins.summary == "Creates a widget"


def test_openapi_minimal():
    tools = {t.name: t for t in ingest_openapi(FIX / "openapi_minimal.json")}
    assert set(tools) == {"getPet", "DELETE /pets/{petId}", "createPet"}
    get = tools["getPet"]
    assert get.parameter("petId").required and get.parameter("petId").type == "integer"  # $ref resolved
    assert get.returns == "The pet" and get.license == "MIT"
    delete = tools["DELETE /pets/{petId}"]
    assert {p.name for p in delete.parameters} == {"petId", "force"}  # path-level + operation-level
    create = tools["createPet"]
    assert create.parameter("body").required and "Pet" in create.parameter("body").description
    assert create.parameter("kind").enum == ("cat", "dog")


def test_openapi_rejects_swagger(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"swagger": "2.0", "paths": {}}))
    with pytest.raises(DataError, match="OpenAPI 3"):
        ingest_openapi(p)


def test_openapi_string_license_accepted(tmp_path):
    p = tmp_path / "s.json"
    ok = {"responses": {"200": {"description": "ok"}}}
    p.write_text(json.dumps({"openapi": "3.0.0", "info": {"title": "x", "license": "MIT"},
                             "paths": {"/a": {"get": {"operationId": "a", **ok}}}}))
    assert [(t.name, t.license) for t in ingest_openapi(p)] == [("a", "MIT")]


@pytest.mark.parametrize("spec, message", [
    ([{"openapi": "3.0.0"}], r"not an OpenAPI 3 document \(a list, not an object\)"),
    ({"openapi": "3.0.0", "paths": {"/a": None}}, "path item '/a' must be an object, not null"),
    ({"openapi": "3.0.0", "paths": {"/a": {"get": "list them"}}}, "GET /a must be an object, not str"),
    ({"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [7]}}}}, "a parameter of .*GET /a must be an object"),
    ({"openapi": "3.0.0", "info": "x", "paths": {}}, "info must be an object"),
])
def test_openapi_malformed_specs_are_data_errors(tmp_path, spec, message):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message):
        ingest_openapi(p)


def test_catalog_roundtrip_and_checksum(tmp_path):
    tools = ingest_manpages(FIX)
    out = tmp_path / "cat"
    save_catalog(tools, out, info={"source": "test"})
    cat = load_catalog(out)
    assert len(cat) == 3 and cat["gcloud demo widgets create"] == next(t for t in tools if t.name.endswith("create"))
    with pytest.raises(DataError, match="similar"):
        cat["gcloud demo widgets"]
    (out / "tools.jsonl").write_text((out / "tools.jsonl").read_text().replace("widget", "gizmo"))
    with pytest.raises(DataError, match="checksum|size"):
        load_catalog(out)


def test_duplicate_names_refused(tmp_path):
    with pytest.raises(DataError, match="unique"):
        save_catalog([Tool("a", ""), Tool("a", "")], tmp_path / "c", info={})


def test_cli_ingest_show_retrieve_validate(tmp_path):
    from lmlab.cli import cli

    out = tmp_path / "cat"
    r = CliRunner().invoke(cli, ["tools", "ingest", "manpages", str(FIX), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 tools" in r.output
    r = CliRunner().invoke(cli, ["tools", "show", str(out), "gcloud demo gadgets delete"])
    assert r.exit_code == 0 and "--force" in r.output and "delete a gadget permanently" in r.output
    r = CliRunner().invoke(cli, ["tools", "retrieve", str(out), "remove a gadget permanently", "-k", "1"])
    assert r.exit_code == 0 and "gcloud demo gadgets delete" in r.output
    r = CliRunner().invoke(cli, ["tools", "validate", str(out), "gcloud demo gadgets delete g1 --forse"])
    assert r.exit_code == 1 and "did you mean --force" in r.output


def test_cli_prompt_prints_budgeted_prompt(tmp_path):
    from lmlab.cli import cli

    out = tmp_path / "cat"
    assert CliRunner().invoke(cli, ["tools", "ingest", "manpages", str(FIX), "--out", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["tools", "prompt", str(out), "delete the gadget g1", "--n-docs", "1",
                                 "--budget", "200"])
    assert r.exit_code == 0, r.output
    assert "## gcloud demo gadgets delete" in r.output and "Request: delete the gadget g1" in r.output
    tokens = int(r.output.strip().splitlines()[-1].split()[1])
    assert tokens <= 200


def test_manpage_catalog_ingests_or_reuses(tmp_path, monkeypatch):
    import tempfile

    from lmlab.tools.manpages import manpage_catalog

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    fresh = manpage_catalog(FIX)
    assert list(scratch.iterdir()) == []  # the ingested copy is not left behind
    names = sorted(t.name for t in fresh)
    assert names and all(n.startswith("gcloud demo") for n in names)
    saved = save_catalog(ingest_manpages(FIX), tmp_path / "cat", info={"source": "test"})
    assert sorted(t.name for t in manpage_catalog("/no/such/man", catalog=tmp_path / "cat")) == \
        sorted(t.name for t in saved)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_damaged_records_are_a_data_error_without_verify(tmp_path, capsys, damage):
    from lmlab.cli import main

    out = tmp_path / "cat"
    save_catalog(ingest_manpages(FIX), out, info={"source": "test"})
    records = out / "tools.jsonl"
    if damage == "truncate":
        records.write_bytes(records.read_bytes()[:300])
    elif damage == "garble":  # same size, so only the parse catches it
        records.write_bytes(b"x" + records.read_bytes()[1:])
    else:
        records.unlink()
    with pytest.raises(DataError, match="tools.jsonl is missing or corrupted"):
        load_catalog(out, verify=False)
    assert main(["tools", "show", str(out), "gcloud demo gadgets delete"]) == 2
    err = capsys.readouterr().err
    assert "tools.jsonl is missing or corrupted: re-run `lmlab tools ingest`" in err and "Traceback" not in err


def test_discovery_keeps_method_parameter_named_like_an_api_wide_one():
    from lmlab.tools.discovery import discovery_tools

    common = {"key": {"type": "string", "location": "query", "description": "API key."},
              "alt": {"type": "string", "location": "query"}}
    doc = {"name": "recaptcha", "parameters": common, "resources": {"keys": {"methods": {"get": {
        "id": "recaptcha.keys.get", "httpMethod": "GET", "path": "v1/{+key}",
        "parameters": {"key": {"type": "string", "required": True, "location": "path"},
                       "alt": dict(common["alt"])}}}}}}  # "key": its own path parameter; "alt": a repeat
    (tool,) = discovery_tools(doc)
    assert [p.name for p in tool.parameters] == ["key"]
    assert tool.parameter("key").required and tool.parameter("key").kind == "path"


def test_save_refuses_to_replace_a_folder_that_is_not_a_catalogue(tmp_path, capsys):
    """--out used to be replaced wholesale, whatever it held (a typo'd --out deleted the user's folder)."""
    from lmlab.cli import main

    tools = ingest_manpages(FIX)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a tool catalogue"):
        save_catalog(tools, mine, info={})
    assert (mine / "notes.txt").read_text() == "keep me"
    rc = main(["tools", "ingest", "manpages", str(FIX), "--out", str(mine)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and (mine / "notes.txt").exists()
    assert [ln for ln in err.splitlines() if ln.startswith("lmlab: error:")] == [
        f"lmlab: error: {mine} exists and is not a tool catalogue: writing there would delete it; choose another "
        "output folder (or remove it yourself)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_catalog(tools, empty, info={})  # an empty folder, or an earlier catalogue, is replaced
    save_catalog(tools[:1], empty, info={})
    assert len(load_catalog(empty)) == 1


def test_ingest_license_is_normalised_to_spdx_and_own_licences_pass(tmp_path):
    from lmlab.cli import main

    for given, stored in (("apache 2.0", "Apache-2.0"), ("LicenseRef-Internal", "LicenseRef-Internal")):
        out = tmp_path / given.replace(" ", "_")
        assert main(["tools", "ingest", "openapi", str(FIX / "openapi_minimal.json"), "--license", given,
                     "--out", str(out)]) == 0
        assert {t.license for t in load_catalog(out).tools} == {stored}
