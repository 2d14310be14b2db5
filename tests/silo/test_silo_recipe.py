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


def test_the_headline_is_the_gap_of_the_means_not_the_mean_of_the_gaps(recipe):
    # seed 1's reference is barely better than its parametric LM: its own fraction is 155.4 / 0.8 = 19425%
    per_seed = {"0": run(376.0, 228.0, 280.0), "1": run(371.7, 216.3, 370.9), "2": run(332.0, 194.0, 291.0)}
    mean, std, gaps = recipe.aggregate(per_seed)
    r = mean["restricted"]
    assert r["parametric"] == pytest.approx((376.0 + 371.7 + 332.0) / 3)
    assert gaps["restricted"]["knn_lm"] == pytest.approx((r["parametric"] - r["knn_lm"]) / (r["parametric"]
                                                                                           - r["reference"]))
    assert std["restricted"]["reference"] == pytest.approx(statistics.stdev([280.0, 370.9, 291.0]))
    s = recipe.make_summary(mean, gaps, None, "python recipes/silo.py", std=std, per_seed=per_seed)
    assert s["ours"].startswith(f"{gaps['restricted']['knn_lm']:.0%} closed (means of 3 seeds)")
    assert "±" in s["ours"] and f"seed 1: {155.4 / 0.8:.0%}" in s["reproduced"] and s["reproduced"].startswith("yes")
    assert "kNN-LM beats both LMs in every seed" in s["reproduced"]


def test_one_seed_and_an_undefined_gap(recipe):
    one = {"0": run(300.0, 200.0, 250.0)}
    mean, std, gaps = recipe.aggregate(one)
    s = recipe.make_summary(mean, gaps, None, "cmd", std=std, per_seed=one)
    assert s["ours"].startswith("200% closed: ") and "±" not in s["ours"] and "Per seed" not in s["reproduced"]
    worse = {"0": run(300.0, 200.0, 310.0), "1": run(300.0, 220.0, 305.0)}
    mean, std, gaps = recipe.aggregate(worse)
    assert math.isnan(gaps["restricted"]["knn_lm"])
    s = recipe.make_summary(mean, gaps, None, "cmd", std=std, per_seed=worse)
    assert s["ours"].startswith("gap undefined") and s["reproduced"].startswith("no: the reference LM")


def test_resummarize_reads_the_recorded_seeds(recipe, tmp_path):
    per_seed = {"0": run(376.0, 228.0, 280.0), "1": run(332.0, 194.0, 291.0)}
    mean, std, gaps = recipe.aggregate(per_seed)
    out = tmp_path / "silo.json"
    out.write_text(json.dumps({"summary": {"command": "cmd"}, "perplexity": mean, "perplexity_std": std,
                               "gap_closed": gaps, "per_seed": per_seed, "smollm2": None}))
    assert recipe.main(["--resummarize", "--out", str(out)]) == 0
    assert "(means of 2 seeds)" in json.loads(out.read_text())["summary"]["ours"]


def test_bad_seeds_are_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "silo.py"), "--seeds", "0,x", "--work",
                           "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --seeds takes comma-separated integers, got '0,x'"
