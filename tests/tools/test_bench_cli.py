"""`lmlab tools bench cloud-cli` end to end: a fixture catalogue, a tiny local model, every --mode."""

import json
import shutil
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.tools.catalog import load_catalog, save_catalog
from lmlab.tools.cloud_cli import build_benchmark
from lmlab.tools.manpages import ingest_manpages

FIX = Path(__file__).parent / "fixtures"

# "gcloud demo knobs" hashes into the test split (CliBenchmarkConfig defaults); the other fixture pages are train.
KNOBS_TURN = FIX / "bench" / "gcloud_demo_knobs_turn.1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny:micro saved as a local Hugging Face folder, with a 2048-token window so that demonstrations fit."""
    from lmlab.lm import models

    loaded = models.load("tiny:micro", seed=0)
    loaded.model.config.max_position_embeddings = 2048
    out = tmp_path_factory.mktemp("model") / "tiny"
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    pages = tmp_path_factory.mktemp("man")
    for p in FIX.glob("*.1"):
        shutil.copy(p, pages / p.name)
    shutil.copy(KNOBS_TURN, pages / KNOBS_TURN.name)
    out = tmp_path_factory.mktemp("cat") / "catalog"
    save_catalog(ingest_manpages(pages), out, info={"source": "test"})
    bench = build_benchmark(load_catalog(out))
    assert {e.tool for e in bench.split("test")} == {"gcloud demo knobs turn"}  # the fixture's premise
    assert len(bench.split("test")) == 2 and bench.split("train")
    return out


def _bench(catalog, model_dir, tmp_path, mode, *extra):
    out = tmp_path / f"{mode}.json"
    rc = main(["tools", "bench", "cloud-cli", "--catalog", str(catalog), "--mode", mode, "--model", model_dir,
               "--limit", "5", "--n-docs", "2", "--n-demos", "2", "--budget", "1500", "--max-tokens", "3",
               "--out", str(out), *extra])
    return rc, out


@pytest.mark.parametrize("mode", ["none", "demos", "docs", "both"])
def test_bench_cloud_cli_each_mode(catalog, model_dir, tmp_path, capsys, mode):
    rc, out = _bench(catalog, model_dir, tmp_path, mode)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    assert printed.startswith(f"{mode}: n=2 path_acc=") and "flag_f1=" in printed and "exact=" in printed
    data = json.loads(out.read_text())
    s = data["scores"]
    assert s["n"] == 2 and 0 <= s["path_accuracy"] <= 1 and 0 <= s["flag_f1"] <= 1
    assert f"path_acc={s['path_accuracy']:.3f}" in printed and f"exact={s['exact_match']:.3f}" in printed
    assert data["config"]["mode"] == mode and data["model"] == model_dir and data["split"] == "test"
    assert data["shot"] == ("few-shot" if mode in ("demos", "both") else "zero-shot")
    recs = data["records"]
    assert sorted(r["gold"] for r in recs) == ["gcloud demo knobs turn bass --position=3 --quiet",
                                              "gcloud demo knobs turn volume --position=11"]
    assert all(r["prompt_tokens"] <= 1500 for r in recs)
    assert all(r["format"] == "completion" for r in recs)  # the byte tokenizer has no chat template
    if mode in ("docs", "both"):
        # BM25 over the catalogue finds the planted page for both requests
        assert data["retrieval_recall"] == 1.0 and "retrieval_recall@2=1.000" in printed
        # at most --n-docs candidates, and only tools sharing a word with the request (BM25 score > 0)
        assert all(r["candidates"][0] == "gcloud demo knobs turn" and 1 <= len(r["candidates"]) <= 2 for r in recs)
    else:
        assert data["retrieval_recall"] is None and "retrieval_recall" not in printed
        assert all(r["candidates"] == [] for r in recs)
    if mode in ("demos", "both"):
        # demonstrations come from the train split only: never the test command
        assert all(r["demos"] and "gcloud demo knobs turn" not in r["demos"] for r in recs)
    else:
        assert all(r["demos"] == [] for r in recs)


def test_bench_cloud_cli_small_budget(catalog, model_dir, tmp_path, capsys):
    out = tmp_path / "small.json"
    args = ["tools", "bench", "cloud-cli", "--catalog", str(catalog), "--mode", "both", "--model", model_dir,
            "--n-docs", "3", "--max-tokens", "2", "--out", str(out)]
    assert main([*args, "--budget", "320"]) == 0
    recs = json.loads(out.read_text())["records"]
    assert all(r["prompt_tokens"] <= 320 for r in recs)
    capsys.readouterr()
    assert main([*args, "--budget", "120"]) == 2  # the bare request (~200 byte tokens) cannot fit
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmlab: error: the request alone takes") and "over the budget of 120" in err


def test_bench_cloud_cli_unknown_catalogue_is_one_line(tmp_path, capsys):
    rc = main(["tools", "bench", "cloud-cli", "--catalog", str(tmp_path / "nope"), "--model", "tiny:micro"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0
    assert "no tool catalogue at" in err and "lmlab tools ingest" in err and "Traceback" not in err


def test_bench_cloud_cli_bad_mode_is_one_line(catalog, capsys):
    rc = main(["tools", "bench", "cloud-cli", "--catalog", str(catalog), "--mode", "oracle", "--model", "tiny:micro"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0
    assert "unknown --mode 'oracle'" in err and "none, demos, docs, both" in err


def test_bench_cloud_cli_unknown_model_is_one_line(catalog, capsys):
    rc = main(["tools", "bench", "cloud-cli", "--catalog", str(catalog), "--mode", "none", "--model", "gpt-17"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and "unknown model 'gpt-17'" in err


def test_prompt_command_answers_a_base_model_in_completion_format(catalog, model_dir, capsys):
    rc = main(["tools", "prompt", str(catalog), "Turn the knob called 'treble' to position 4", "--mode", "both",
               "--n-docs", "1", "--n-demos", "1", "--budget", "1500", "--model", model_dir, "--max-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    _, _, rest = out.partition("--- completion prompt (base model), ")
    assert int(rest.split()[0]) <= 1500
    assert "## gcloud demo knobs turn" in rest and "Command: gcloud" in rest
    assert "\nreply: gcloud" in out and ("command: gcloud" in out or "no gcloud command in the reply" in out)
    rc = main(["tools", "prompt", str(catalog), "anything", "--mode", "few-shot"])
    assert rc == 2 and "unknown --mode 'few-shot'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["retrieve", "{cat}", "knob", "-k", "-1"], "-k must be at least 1, not -1"),
    (["bench", "cloud-cli", "--catalog", "{cat}", "--limit", "-1", "--model", "tiny:micro"],
     "--limit must be at least 1, not -1"),
    (["bench", "cloud-cli", "--catalog", "{cat}", "--n-demos", "-2", "--model", "tiny:micro"],
     "--n-demos must be at least 0, not -2"),
    (["prompt", "{cat}", "knob", "--n-docs", "0"], "--n-docs must be at least 1, not 0"),
    (["bench", "cloud-cli", "--catalog", "{cat}", "--threads", "100000", "--model", "tiny:micro"],
     "--threads must be at most 256, not 100000"),
    (["retrieve", "{cat}", "  "], "REQUEST is empty"),
    (["prompt", "{cat}", ""], "REQUEST is empty"),
    (["retrieve", "{cat}", "knob", "--method", "dense", "--model", "{empty}"], "is not a sentence-transformers model"),
    (["ingest", "manpages", "--tracks", "ga,nope", "--out", "{empty}/cat"], "unknown release track(s) nope"),
    (["ingest", "openapi", "{empty}", "--license", "NOT-A-LICENCE", "--out", "{empty}/cat"],
     "--license 'NOT-A-LICENCE' is not a licence lmlab recognises"),
])
def test_bad_values_are_one_line(catalog, capsys, tmp_path, args, message):
    rc = main(["tools", *(a.replace("{cat}", str(catalog)).replace("{empty}", str(tmp_path)) for a in args)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and message in err and "Traceback" not in err


def test_bench_without_catalog_leaves_no_folder(model_dir, tmp_path, monkeypatch, capsys):
    import tempfile

    from lmlab.tools import cli as tools_cli

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(tools_cli, "DEFAULT_MAN", str(FIX / "*.1"))  # the fixture pages stand in for gcloud's
    rc = main(["tools", "bench", "cloud-cli", "--mode", "none", "--model", model_dir, "--split", "train",
               "--limit", "1", "--max-tokens", "2", "--budget", "1500"])
    assert rc == 0 and capsys.readouterr().out.strip().splitlines()[-1].startswith("none: n=1")
    assert list(scratch.iterdir()) == []


def test_retrieve_with_an_existing_index_uses_the_given_model(catalog, tmp_path, monkeypatch, capsys):
    """--model used to be ignored once the index existed; now it is the encoder the index is checked against."""
    import lmlab.tools.retrieve as retrieve

    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    seen = {}

    def fake_load(cls, folder, cat, *, encoder=None):
        seen["encoder"] = encoder
        raise retrieve.ManifestMismatchError("checked")

    monkeypatch.setattr(retrieve, "load_minilm", lambda path=None, **kw: f"encoder:{path}")
    monkeypatch.setattr(retrieve.DenseRetriever, "load", classmethod(fake_load))
    rc = main(["tools", "retrieve", str(catalog), "list things", "--method", "dense", "--index", str(index),
               "--model", "my-model"])
    assert rc == 2 and seen["encoder"] == "encoder:my-model" and "checked" in capsys.readouterr().err


def test_retrieve_refuses_a_foreign_index_folder_before_encoding(catalog, tmp_path, monkeypatch, capsys):
    """A --index folder that is not an index is refused at once, not after the catalogue has been encoded."""
    import lmlab.tools.retrieve as retrieve

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    built = []
    monkeypatch.setattr(retrieve.DenseRetriever, "__init__", lambda self, *a, **k: built.append(1))
    rc = main(["tools", "retrieve", str(catalog), "list things", "--method", "dense", "--index", str(mine)])
    assert rc == 2 and built == [] and (mine / "notes.txt").read_text() == "keep me"
    assert "is not a dense tool index" in capsys.readouterr().err
