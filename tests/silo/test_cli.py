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


def test_build_eval_generate_optout(corpus, tmp_path, capsys):
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
    assert main(["silo", "build-ric", "--corpus", str(corpus / "train"), "--model", "tiny:micro",
                 "--out", str(tmp_path / "ric"), "--block-tokens", "32"]) == 0
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
