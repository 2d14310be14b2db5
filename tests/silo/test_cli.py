"""`lmlab silo ...` end to end on a plain folder corpus with tiny:micro."""

import json

import pytest
import torch

from lmlab.cli import main

torch.set_num_threads(1)


@pytest.fixture()
def corpus(tmp_path, docs):
    for split, chunk in (("train", docs[:9] + docs[-1:]), ("validation", docs[9:11]), ("test", docs[11:12])):
        (tmp_path / "split" / split).mkdir(parents=True)
        with open(tmp_path / "split" / split / "docs.jsonl", "w") as f:
            for d in chunk:
                f.write(json.dumps({"text": d.text}) + "\n")
    return tmp_path / "split"


def test_build_eval_generate_optout(corpus, tmp_path, capsys, monkeypatch):
    ds = str(tmp_path / "ds")
    small = ["--window", "64", "--stride", "32", "--docs-per-chunk", "4"]
    assert main(["silo", "build-datastore", "--corpus", str(corpus / "train"), "--model", "tiny:micro",
                 "--out", ds, "--restricted", *small]) == 0
    assert "entries" in capsys.readouterr().out
    for i in range(2):
        assert main(["silo", "build-datastore", "--corpus", str(corpus / "train"), "--model", "tiny:micro",
                     "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2", *small]) == 0
    assert main(["silo", "merge-shards", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                 str(tmp_path / "merged"), *small]) == 0
    capsys.readouterr()
    # settings the shards were encoded with cannot be changed by the merge: refused, not silently ignored
    assert main(["silo", "merge-shards", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                 str(tmp_path / "m2"), "--window", "128", "--key-point", "model.layers.0.mlp:input"]) == 2
    assert "--window 128 (the shards': 64), --key-point" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
    assert main(["silo", "build-ric", "--corpus", str(corpus / "train"), "--model", "tiny:micro",
                 "--out", str(tmp_path / "ric"), "--block-tokens", "32"]) == 0
    (tmp_path / "empty").mkdir()
    with monkeypatch.context() as m:  # a bad --ric is found before the evaluation, not after it
        m.setattr("lmlab.silo.KnnLM.tune", lambda *a, **k: pytest.fail("evaluated before checking --ric"))
        assert main(["silo", "eval", "--datastore", ds, "--model", "tiny:micro", "--validation",
                     str(corpus / "validation"), "--test", str(corpus / "test"), "--ric", str(tmp_path / "empty")]) == 2
    out = tmp_path / "eval.json"
    assert main(["silo", "eval", "--datastore", ds, "--model", "tiny:micro", "--validation",
                 str(corpus / "validation"), "--test", str(corpus / "test"), "--ric", str(tmp_path / "ric"),
                 "--ric-window", "128", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["test"]["ppl_knn"] <= res["test"]["ppl_lm"] * 1.01 and res["test"]["ppl_ric"] > 0
    capsys.readouterr()
    assert main(["silo", "generate", "--datastore", ds, "--model", "tiny:micro", "--prompt", "Note 3: pack",
                 "--max-tokens", "8", "--lmbda", "0.7", "--k", "16", "--attribute"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Note 3: pack") and "<-" in printed
    assert main(["silo", "optout", "--datastore", ds, "--source", "nowhere:*"]) == 2  # matches nothing
    manifest = (tmp_path / "ds" / "manifest.json").read_text()
    # a bad --ric is refused before the datastore is changed (it was opted out already, and the index was not)
    assert main(["silo", "optout", "--datastore", ds, "--source", "text:*", "--ric", str(tmp_path / "empty")]) == 2
    assert (tmp_path / "ds" / "manifest.json").read_text() == manifest
    capsys.readouterr()
    assert main(["silo", "optout", "--datastore", ds, "--source", "text:*", "--ric", str(tmp_path / "ric")]) == 0
    assert "removed 10 documents" in capsys.readouterr().out
    # an emptied datastore still generates (from the parametric model alone)
    assert main(["silo", "generate", "--datastore", ds, "--model", "tiny:micro", "--prompt", "Note", "--k", "4",
                 "--max-tokens", "3"]) == 0
    # refused with another model
    assert main(["silo", "generate", "--datastore", ds, "--model", "tiny:small", "--prompt", "x"]) == 2
    assert main(["silo", "build-datastore", "--corpus", str(corpus), "--model", "tiny:micro", "--out", ds,
                 "--shard", "nonsense"]) != 0


def test_pipeline(corpus, tmp_path, capsys):
    assert main(["silo", "pipeline", "--corpus", str(corpus), "--model", "tiny:micro", "--out",
                 str(tmp_path / "run"), "--window", "64"]) == 0
    printed = capsys.readouterr().out
    assert "test perplexity" in printed and "sample:" in printed
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["test_ppl_knn"] <= res["test_ppl_lm"] * 1.01
    assert "test_ppl_reference" not in res


def test_pipeline_with_reference(corpus, tmp_path, capsys):
    # the same random model as its own reference: equal perplexity, so the gap is undefined (NaN), not a number
    assert main(["silo", "pipeline", "--corpus", str(corpus), "--model", "tiny:micro", "--reference", "tiny:micro",
                 "--out", str(tmp_path / "run"), "--window", "64"]) == 0
    assert "reference" in capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["test_ppl_reference"] == pytest.approx(res["test_ppl_lm"], rel=1e-5)
    assert res["gap_closed_knn"] != res["gap_closed_knn"]


def test_pipeline_checks_the_reference_before_building(corpus, tmp_path, capsys):
    assert main(["silo", "pipeline", "--corpus", str(corpus), "--model", "tiny:micro", "--reference", "nonexistent",
                 "--out", str(tmp_path / "run"), "--window", "64"]) == 2
    assert "unknown model 'nonexistent'" in capsys.readouterr().err and not (tmp_path / "run").exists()


EVAL = "eval --datastore {dir} --model tiny:micro --validation {corpus}/validation --test {corpus}/test"
BUILD = "build-datastore --corpus {corpus}/train --model tiny:micro --out {t}/out"
PIPELINE = "pipeline --corpus {corpus} --model tiny:micro"
DEMO = "demo --work {t}/out --corpus {dir}"


@pytest.mark.parametrize("command, message", [
    (f"{BUILD} --factory IVF16,Flat --nprobe 0", "nprobe must be at least 1"),
    (f"{BUILD} --max-docs -1", "--max-docs must be at least 1"),
    (f"{BUILD} --stride 0", "0 < stride <= window"),
    (f"{BUILD} --shard 3/2", "--shard takes i/n with 0 <= i < n"),
    (f"{BUILD} --license-class copyleft --restricted", "not both"),
    (f"{BUILD} --license-class nope", "unknown licence class 'nope'"),
    ("build-datastore --corpus {corpus}/train --model tiny:micro --out {file}", "is not a silo-datastore"),
    ("build-datastore --corpus {corpus}/train --model smollm2-135m --tokenizer {dir} --out {t}/out",
     "--tokenizer is for tiny:* models only"),
    ("build-ric --corpus {corpus}/train --model tiny:micro --out {t}/out --license-class copyleft --restricted",
     "not both"),
    ("build-ric --corpus {corpus}/train --model tiny:micro --out {t}/out --block-tokens 0",
     "--block-tokens must be at least 1"),
    (f"{EVAL} --ric-window 0", "--ric-window must be at least 1"),
    (f"{EVAL} --ric-window 64", "give --ric too"),
    (f"{EVAL} --ric {{dir}} --ric-window -5", "--ric-window must be at least 1"),
    (f"{EVAL} --max-docs -1", "--max-docs must be at least 1"),
    (f"{EVAL} --json {{dir}}", "is a folder"),
    ("generate --datastore {dir} --model tiny:micro --prompt x --temperature nan", "temperature must be a positive"),
    ("generate --datastore {dir} --model tiny:micro --prompt x --temperature inf", "temperature must be a positive"),
    ("serve --datastore {dir} --model tiny:micro --audit-log {dir}", "is a folder"),
    (f"{PIPELINE} --out {{file}}", "is a file, not a folder"),
    (f"{PIPELINE} --out {{t}}/out --window 0", "--window must be at least 2"),
    (f"{PIPELINE} --out {{t}}/out --window -1", "--window must be at least 2"),
    (f"{PIPELINE} --out {{t}}/out --max-docs -1", "--max-docs must be at least 1"),
    ("demo --work {file} --corpus {dir}", "is a file, not a folder"),
    (f"{DEMO} --eval-tokens -5", "eval_tokens must be at least 2"),
    (f"{DEMO} --permissive-mb nan", "permissive_mb must be a positive finite number"),
    (f"{DEMO} --max-mb-per-source -1", "--max-mb-per-source caps the corpus the demo builds"),
])
def test_bad_options_are_one_line_before_any_work(command, message, corpus, tmp_path, monkeypatch, capsys):
    t = tmp_path / "t"
    (t / "dir").mkdir(parents=True)
    (t / "file").write_text("the user's")
    monkeypatch.setattr("lmlab.lm.models.load", lambda *a, **k: pytest.fail("loaded a model before the check"))
    argv = command.format(corpus=corpus, t=t, dir=t / "dir", file=t / "file").split()
    assert main(["silo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: ") and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in t.iterdir()) == ["dir", "file"] and (t / "file").read_text() == "the user's"
