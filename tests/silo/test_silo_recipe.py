"""recipes/silo.py's aggregation over seeds and its results-table row (the experiment itself: test_experiment.py)."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("silo_recipe", ROOT / "recipes" / "silo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(parametric, knn, reference, ric=None):
    row = {"parametric": parametric, "knn_lm": knn, "reference": reference, "ric_lm": ric or parametric}
    gap = (parametric - knn) / (parametric - reference) if parametric > reference else float("nan")
    return {"perplexity": {"restricted": row, "permissive": dict(row)}, "gap_closed": {"restricted": {"knn_lm": gap}}}


def test_seeds_are_compared_within_seed_then_averaged(recipe):
    # seed 1's reference is barely better than its parametric LM: its own fraction is 155.4 / 0.8 = 19425%;
    # seed 2's test packages are harder (every perplexity higher)
    per_seed = {"0": run(376.0, 228.0, 280.0), "1": run(371.7, 216.3, 370.9), "2": run(558.6, 441.8, 537.6)}
    agg = recipe.aggregate(per_seed)
    knn = [1 - 228.0 / 376.0, 1 - 216.3 / 371.7, 1 - 441.8 / 558.6]
    ref = [1 - 280.0 / 376.0, 1 - 370.9 / 371.7, 1 - 537.6 / 558.6]
    assert agg["drop"]["restricted"]["knn_lm"] == pytest.approx(statistics.fmean(knn))
    assert agg["drop_std"]["restricted"]["reference"] == pytest.approx(statistics.stdev(ref))
    assert agg["gap_closed"]["restricted"]["knn_lm"] == pytest.approx(statistics.fmean(knn) / statistics.fmean(ref))
    assert agg["perplexity"]["restricted"]["parametric"] == pytest.approx((376.0 + 371.7 + 558.6) / 3)
    s = recipe.make_summary(agg, None, "python recipes/silo.py", per_seed=per_seed)
    g = agg["gap_closed"]["restricted"]["knn_lm"]
    knn_pm = f"{statistics.fmean(knn) * 100:.0f}±{statistics.stdev(knn) * 100:.0f}%"
    assert s["ours"].startswith(f"{g:.0%} of the gap closed (3 seeds): restricted test perplexity {knn_pm} lower with")
    assert "seed 1: parametric 371.7, kNN-LM 216.3, reference 370.9" in s["ours"]
    fractions = ", ".join(f"{f:.0%}" for f in (148 / 96, 155.4 / 0.8, 116.8 / 21.0))
    assert f"The seeds' own fractions ({fractions})" in s["reproduced"]
    assert s["reproduced"].startswith("yes") and "kNN-LM beats both LMs in every seed" in s["reproduced"]


def test_one_seed_is_the_plain_gap_and_an_undefined_gap_is_no(recipe):
    one = {"0": run(300.0, 200.0, 250.0)}
    agg = recipe.aggregate(one)
    assert agg["gap_closed"]["restricted"]["knn_lm"] == pytest.approx((300 - 200) / (300 - 250))
    s = recipe.make_summary(agg, None, "cmd", per_seed=one)
    assert s["ours"].startswith("200% of the gap closed (1 seed): restricted test perplexity 33% lower with kNN-LM")
    assert "±" not in s["ours"] and "seeds' own fractions" not in s["reproduced"]
    worse = {"0": run(300.0, 200.0, 310.0), "1": run(300.0, 220.0, 305.0)}
    agg = recipe.aggregate(worse)
    assert math.isnan(agg["gap_closed"]["restricted"]["knn_lm"])
    s = recipe.make_summary(agg, None, "cmd", per_seed=worse)
    assert s["ours"].startswith("gap undefined") and s["reproduced"].startswith("no: the reference LM")


def test_resummarize_recomputes_from_the_recorded_seeds(recipe, tmp_path):
    per_seed = {"0": run(376.0, 228.0, 280.0), "1": run(332.0, 194.0, 291.0)}
    out = tmp_path / "silo.json"
    out.write_text(json.dumps({"summary": {"command": "cmd"}, "per_seed": per_seed, "smollm2": None}))
    assert recipe.main(["--resummarize", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "(2 seeds)" in got["summary"]["ours"]
    assert got["gap_closed"] == recipe.aggregate(per_seed)["gap_closed"]


def test_bad_seeds_are_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "silo.py"), "--seeds", "0,x", "--work",
                           "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --seeds takes comma-separated integers, got '0,x'"


def _tiny_corpus(folder):
    spec = importlib.util.spec_from_file_location("silo_test_exp", ROOT / "tests" / "silo" / "test_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._corpus(folder)


def _tiny_args(tmp_path, corpus, sizes):
    return ["--work", str(tmp_path / "w"), "--corpus", str(corpus), "--seeds", "0", "--preset", "micro",
            "--vocab-size", "300", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--lr", "0.01",
            "--sequential", "--window", "32", "--eval-tokens", "300", "--k-grid", "4,16", "--ric-block-tokens", "16",
            "--skip-smollm2", "--threads", "1", "--device", "cpu", "--sizes", sizes, "--plot", "",
            "--out", str(tmp_path / "out.json")]


def test_interrupted_size_curve_resumes_with_the_smaller_datastore(recipe, tmp_path, monkeypatch):
    from lmlab.silo.datastore import Datastore

    args = _tiny_args(tmp_path, _tiny_corpus(tmp_path / "c"), "0.5,0.99,1.0")
    optout = Datastore.optout

    def interrupted(self, **kw):  # Ctrl-C after the copy of the datastore, before its opt-out is written
        raise KeyboardInterrupt

    monkeypatch.setattr(Datastore, "optout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args)
    monkeypatch.setattr(Datastore, "optout", optout)
    assert recipe.main(args) == 0  # resumes every stage
    res = json.loads((tmp_path / "out.json").read_text())
    curve = {c["fraction"]: c["live_entries"] for c in res["size_curve"]}
    full = res["datastore"]["entries"]
    # the half-size point is a half-size datastore, not the whole one left by the interrupted copy
    assert 0 < curve[0.5] < 0.75 * full and curve[1.0] == full
    # 0.99 of the tokens takes every document here: the whole datastore, not an empty opt-out (a traceback)
    assert curve[0.99] == full


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "error: --threads must be at least 1, got 0"),
    (["--seeds", "0,0"], "error: --seeds takes comma-separated integers, each once, got '0,0'"),
    (["--k-grid", "4,x"], "error: --k-grid takes comma-separated integers >= 1, got '4,x'"),
    (["--k-grid", "0,16"], "error: --k-grid takes comma-separated integers >= 1, each once, got '0,16'"),
    (["--sizes", "0.5,x"], "error: --sizes takes comma-separated fractions in (0, 1], got '0.5,x'"),
    (["--sizes", "0,1"], "error: --sizes takes comma-separated fractions in (0, 1], each once, got '0,1'"),
    (["--resummarize"], "error: --resummarize needs this recipe's results"),
])
def test_bad_flags_are_one_line_before_any_work(recipe, flags, message, capsys, tmp_path):
    # a corpus that is not there: if a flag went unchecked, the run would stop at it with another message
    assert recipe.main(["--work", str(tmp_path / "w"), "--corpus", str(tmp_path / "none"), "--plot", "",
                        "--out", str(tmp_path / "out.json"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "w").exists()
