from pathlib import Path

import pytest

from lmlab.errors import DataError
from lmlab.tools.manpages import clean_request, ingest_manpages, page_to_tool, parse_manpage, read_manpage, unescape

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def widget():
    return page_to_tool(read_manpage(FIX / "gcloud_demo_widgets_create.1"))


def test_unescape_characters_and_fonts():
    assert unescape(r"\fB\-\-zone\fR=\fIZONE\fR \e \(em \'x'") == "--zone=ZONE \\ \u2014 'x'"


def test_sections_name_and_summary():
    page = read_manpage(FIX / "gcloud_demo_widgets_create.1")
    assert page.name == "gcloud demo widgets create"
    assert page.summary == "create a demo widget"
    assert {"NAME", "SYNOPSIS", "DESCRIPTION", "EXAMPLES", "REQUIRED FLAGS", "OPTIONAL FLAGS"} <= set(page.sections)
    assert page.sections["DESCRIPTION"].startswith("gcloud demo widgets create creates demo widgets.")


def test_flag_list_with_groups_and_nested_items(widget):
    flags = {p.name: p for p in widget.parameters if p.kind == "flag"}
    assert set(flags) == {"--zone", "--async", "--color", "--labels", "--shiny", "--size", "--source-image",
                          "--source-snapshot"}
    assert "nested" not in flags and "--no-size" not in flags  # sub-items and "--no-" spellings fold in
    assert flags["--zone"].required and flags["--zone"].aliases == ("-z",) and flags["--zone"].metavar == "ZONE"
    assert not flags["--color"].required and flags["--color"].enum == ("red", "green", "blue")
    assert flags["--async"].type == "boolean" and flags["--labels"].type == "array"
    assert "--no-shiny" in flags["--shiny"].aliases and "--no-size" in flags["--size"].aliases
    assert flags["--labels"].description.startswith("List of label KEY=VALUE pairs to add.")
    assert widget.one_of_required == (("--source-image", "--source-snapshot"),)


def test_positionals(widget):
    (pos,) = [p for p in widget.parameters if p.kind == "positional"]
    assert pos.name == "WIDGET_NAMES" and pos.required and pos.repeated
    assert pos.description == "Names of the widgets to create."


def test_examples_with_continuations(widget):
    assert [e.request for e in widget.examples] == [
        "Create a widget called 'example-widget' in zone 'us-central1-a'", "Create two red widgets"]
    first = widget.examples[0].call
    assert first.startswith("gcloud demo widgets create example-widget \\\n") and "--source-image=" in first
    # the block with two commands is skipped; the stray paragraph is not taken as a request
    assert all("wc" not in e.call for e in widget.examples)


def test_multiline_quoted_example_kept_whole():
    tool = page_to_tool(read_manpage(FIX / "gcloud_demo_widgets_list.1"))
    (ex,) = tool.examples
    assert ex.call.endswith('zone)"') and "--filter=" in ex.call


def test_clean_request():
    assert clean_request("To create an instance, run:") == "Create an instance"
    assert clean_request("To list things, use the following command:") == "List things"


def test_ingest_filters_tracks_and_groups():
    names = {t.name for t in ingest_manpages(FIX)}
    assert names == {"gcloud demo widgets create", "gcloud demo widgets list", "gcloud demo gadgets delete"}
    with_beta = {t.name for t in ingest_manpages(FIX, tracks=("ga", "beta"), include_groups=True)}
    assert {"gcloud beta demo gadgets delete", "gcloud demo"} <= with_beta


def test_not_a_man_page():
    with pytest.raises(DataError):
        parse_manpage("hello\nworld\n")


# -- tbl(1) tables ---------------------------------------------------------------------------------

TABLES = FIX / "tables" / "gcloud_demo_widgets_tag.1"


def test_parse_table_rows_per_format_line():
    from lmlab.tools.manpages import parse_table

    t = parse_table(["tab(;);", "lB lB", "l l.", "Alias;URI", "=", "a;x;y", "b", ".T&", "l l.", "c;z"])
    assert t.header and t.rows == [["Alias", "URI"], ["a", "x;y"], ["b", ""], ["c", "z"]]
    assert t.lines() == ["Alias\tURI", "a\tx;y", "b", "c\tz"]  # extra separators stay in the last cell
    plain = parse_table(["l r c.", "1\t2\t3"])  # no options line: tab-separated, no header
    assert not plain.header and plain.rows == [["1", "2", "3"]]
    with pytest.raises(DataError):
        parse_table(["tab(;);"])


def test_table_in_description_is_rows_not_raw_troff():
    page = read_manpage(TABLES)
    desc = page.sections["DESCRIPTION"]
    assert desc.split("\n\n") == [
        "Attach tags to a widget. Tag kinds:",
        "KIND\tLIMIT\tNOTES\ncolor\t3\tone of 'red' or 'blue'\nsize\t1\tsmall, medium or large\nowner\t1",
        "Tags are kept until the widget is deleted.",
    ]
    assert "tab(" not in desc and "lB" not in desc and "T{" not in desc


def test_table_in_flag_description_and_examples_unaffected():
    page = read_manpage(TABLES)
    scopes = next(i for i in page.items if i.term.startswith("--scopes"))
    assert scopes.description.split("\n\n") == [
        "SCOPE can be either the full URI of the scope or an alias. Available aliases are:",
        "Alias\tURI\nbigquery\thttps://www.googleapis.com/auth/bigquery\n"
        "default\thttps://www.googleapis.com/auth/devstorage.read_only\n\thttps://www.googleapis.com/auth/logging.write",
        "Scopes are applied in order.",
    ]
    assert [(e.request, e.call) for e in page.examples] == [
        ("Tag the widget 'w1' with the default scopes", "gcloud demo widgets tag w1")]
    tool = page_to_tool(page)
    assert "bigquery\thttps://www.googleapis.com/auth/bigquery" in tool.parameter("--scopes").description


def test_malformed_table_drops_the_table_not_the_page():
    text = TABLES.read_text()
    start, end = text.index(".TS"), text.index(".TE") + 3
    page = parse_manpage(text[:start] + ".TS\ntab(\t);\n.TE" + text[end:])  # no format line
    assert page.name == "gcloud demo widgets tag"
    assert page.sections["DESCRIPTION"].split("\n\n") == ["Attach tags to a widget. Tag kinds:",
                                                            "Tags are kept until the widget is deleted."]
    assert any(i.term.startswith("--scopes") and "bigquery\t" in i.description for i in page.items)


def test_damaged_gz_is_a_data_error_and_skipped_on_ingest(tmp_path):
    import gzip
    import logging

    page = gzip.compress((FIX / "gcloud_demo_widgets_create.1").read_bytes())
    (tmp_path / "gcloud_demo_widgets_create.1.gz").write_bytes(page)
    (tmp_path / "gcloud_demo_widgets_list.1.gz").write_bytes(page[:len(page) // 2])  # truncated: EOFError
    (tmp_path / "gcloud_demo_gadgets_delete.1.gz").write_bytes(b"\x1f\x8bgarbage")  # BadGzipFile
    for bad in ("gcloud_demo_widgets_list.1.gz", "gcloud_demo_gadgets_delete.1.gz"):
        with pytest.raises(DataError, match="not a readable man page"):
            read_manpage(tmp_path / bad)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # the CLI may have stopped "lmlab.tools" propagating to caplog's root handler
    logging.getLogger("lmlab.tools").addHandler(handler)
    try:
        tools = ingest_manpages(tmp_path)
    finally:
        logging.getLogger("lmlab.tools").removeHandler(handler)
    assert [t.name for t in tools] == ["gcloud demo widgets create"]
    assert sum("not a readable man page" in r.getMessage() for r in records) == 2


def test_cli_ingest_warns_about_a_damaged_page(tmp_path, capsys):
    import gzip

    from lmlab.cli import main

    man = tmp_path / "man"
    man.mkdir()
    page = gzip.compress((FIX / "gcloud_demo_widgets_create.1").read_bytes())
    (man / "gcloud_demo_widgets_list.1.gz").write_bytes(page[:100])
    assert main(["tools", "ingest", "manpages", str(man), "--out", str(tmp_path / "cat")]) == 2  # nothing left
    err = capsys.readouterr().err
    assert "lmlab: warning:" in err and "not a readable man page" in err and "nothing to write" in err
    assert "interrupted" not in err
