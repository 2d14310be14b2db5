"""The shared SILO experiment (``make demo`` / ``recipes/silo.py``) end to end on a small synthetic corpus."""

import json
import random

import pytest
import torch

from lmlab.cli import main

torch.set_num_threads(1)

WORDS = {"permissive": "parse token buffer option value list file path return error".split(),
         "restricted": "kernel module driver patch signal thread socket mount device queue".split()}


def _corpus(folder, groups_per_class=10, docs_per_group=3):
    """A built lmlab corpus: MIT-licensed and GPL-licensed packages with different vocabularies."""
    from lmlab.corpus import CorpusWriter, Document, classify

    rng = random.Random(0)
    with CorpusWriter(folder) as w:
        for kind, lic in (("permissive", "MIT"), ("restricted", "GPL-2.0-only")):
            for g in range(groups_per_class):
                for k in range(docs_per_group):
                    text = " ".join(rng.choice(WORDS[kind]) for _ in range(120)) + "."
                    w.add(Document.create(f"{kind} {g} {k}: {text}", f"test:{kind}{g}:{k}", classify(lic),
                                          group=f"{kind}-{g}", origin="test"))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus") / "c")


def _config(tmp_path, corpus, **kw):
    from lmlab.silo.experiment import ExperimentConfig

    base = dict(work=str(tmp_path / "work"), corpus=str(corpus), vocab_size=300, preset="micro", steps=4,
                batch_size=2, seq_len=32, lr=1e-2, parallel=False, window=32, eval_tokens=300,
                k_grid=(4, 16), ric_block_tokens=16, device="cpu")
    return ExperimentConfig(**{**base, **kw})


def test_experiment_runs_resumes_and_keeps_pools_apart(tmp_path, corpus):
    from lmlab.silo.experiment import SiloExperiment, format_table

    exp = SiloExperiment(_config(tmp_path, corpus), echo=lambda *_: None)
    res = exp.run()
    # the tokenizer and the parametric LM never saw restricted text; the datastore holds only restricted text
    assert {d.license_class for d in exp.pools["permissive_train"]} <= {"permissive_sw", "public_domain"}
    assert {d.license_class for d in exp.pools["restricted_train"]} == {"copyleft"}
    assert {d.license_class for d in exp.ds.docs} == {"copyleft"}
    assert exp.lm_texts("lm-permissive") == [d.text for d in exp.pools["permissive_train"]]
    assert sorted(exp.lm_texts("lm-reference")) == sorted(d.text for d in exp.pools["permissive_train"]
                                                           + exp.pools["restricted_train"])
    test_groups = {d.meta.get("group") for d in exp.pools["restricted_test"]}
    assert test_groups.isdisjoint({d.meta.get("group") for d in exp.pools["restricted_train"]})
    for dom in ("restricted", "permissive"):
        row = res["table"][dom]
        assert set(row) == {"parametric", "ric_lm", "knn_lm", "reference"}
        assert all(0 < v < float("inf") for v in row.values())
    assert res["tuned"]["best"]["k"] in (4, 16)
    assert res["sample"]["tokens"] and "neighbours" in res["sample"]["tokens"][0]
    text = format_table(res["table"], res["gap_closed"])
    r = res["table"]["restricted"]
    assert "gap closed by kNN-LM" in text
    assert f"{r['reference'] / r['parametric'] - 1:+14.1%}" in text.splitlines()[-3]  # reference vs parametric
    json.dumps({k: v for k, v in res.items() if k != "generation"})  # the results are plain JSON

    # a second run finds every stage's output and gives the same numbers without retraining
    model = tmp_path / "work" / "lm-permissive" / "run" / "model" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    again = SiloExperiment(_config(tmp_path, corpus), echo=lambda *_: None).run()
    assert model.stat().st_mtime_ns == mtime
    assert again["table"] == res["table"]


def test_gap_closed():
    from lmlab.silo.experiment import gap_closed

    assert gap_closed(100.0, 50.0, 75.0) == 0.5
    assert gap_closed(100.0, 50.0, 40.0) == 1.2
    assert gap_closed(50.0, 60.0, 40.0) != gap_closed(50.0, 60.0, 40.0)  # NaN: the reference is not better


def test_missing_pool_is_one_clear_error(tmp_path):
    from lmlab.errors import DataError
    from lmlab.silo.experiment import SiloExperiment

    only_permissive = _corpus(tmp_path / "c", groups_per_class=10)
    # drop the restricted documents by filtering them out into a new corpus
    from lmlab.corpus import Corpus, CorpusWriter

    with CorpusWriter(tmp_path / "perm") as w:
        for d in Corpus(only_permissive).filter(license_classes=["permissive_sw"]):
            w.add(d)
    with pytest.raises(DataError, match="no restricted train documents"):
        SiloExperiment(_config(tmp_path, tmp_path / "perm"), echo=lambda *_: None).prepare()


@pytest.mark.slow
def test_demo_cli_trains_in_parallel(tmp_path, corpus, capsys):
    assert main(["silo", "demo", "--work", str(tmp_path / "demo"), "--corpus", str(corpus), "--steps", "2",
                 "--eval-tokens", "600"]) == 0
    out = capsys.readouterr().out
    assert "reference (all data)" in out and "where each generated token came from" in out
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["config"]["parallel"] is True and res["datastore"]["entries"] > 0
    assert main(["silo", "demo", "--work", str(tmp_path / "x"), "--corpus", str(tmp_path / "nope")]) == 2


def test_rerun_with_other_settings_is_refused(tmp_path, corpus):
    from lmlab.errors import ConfigError, DataError
    from lmlab.silo.experiment import SiloExperiment

    quiet = dict(echo=lambda *_: None)
    with pytest.raises(DataError, match="not an lmlab corpus"):  # stopped before building anything
        SiloExperiment(_config(tmp_path, tmp_path / "none", steps=12), **quiet).prepare()
    SiloExperiment(_config(tmp_path, corpus), **quiet).prepare()  # so the corrected flag is taken
    # evaluation-only settings, the device and the training mode may change: nothing built depends on them
    SiloExperiment(_config(tmp_path, corpus, eval_tokens=200, k_grid=(8,), parallel=True), **quiet).prepare()
    # anything that shaped an artefact would be silently reused (a 4-step LM reported as a 12-step one)
    with pytest.raises(ConfigError, match=r"other settings \(steps 4 -> 12, vocab_size 300 -> 400\)"):
        SiloExperiment(_config(tmp_path, corpus, steps=12, vocab_size=400), **quiet).prepare()
    other = _corpus(tmp_path / "other", groups_per_class=11)
    with pytest.raises(ConfigError, match="other settings"):
        SiloExperiment(_config(tmp_path, other), **quiet).prepare()
    # the same corpus copied elsewhere is the same corpus
    import shutil

    shutil.copytree(corpus, tmp_path / "copy")
    SiloExperiment(_config(tmp_path, tmp_path / "copy"), **quiet).prepare()
