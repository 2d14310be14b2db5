"""Tool documentation vs demonstrations on the gcloud cloud-CLI benchmark, with SmolLM2-135M-Instruct.

Claim (Hsieh et al. 2023, "Tool Documentation Enables Zero-Shot Tool-Usage with Large Language
Models", arXiv 2308.00675, Sec. 4 on their LLM-Cloud CLI benchmark): prompting with tool documentation
alone (zero-shot) matches or beats prompting with demonstrations (few-shot), and documentation helps
most when there are many candidate tools.

Ours: requests from the test command groups of our benchmark (built from the gcloud man pages, split by
command group), a fixed-seed sample of ``--limit`` of them. Configurations:

- ``demos``: ``--n-demos`` BM25-nearest train pairs as chat turns, no documentation (few-shot);
- ``docs@r`` for r in ``--docs-r``: documentation of the top-r BM25-retrieved commands (zero-shot);
- ``both``: the demonstrations and the top-``--both-r`` documentation;
- ``oracle@r`` (analysis, not a method): docs mode with the gold command always documented first, so
  the gap to ``docs@r`` is what retrieval costs and its level is the model's ceiling given the docs.

Every prompt is trimmed to ``--budget`` tokens by the rule in :mod:`lmlab.tools.prompting`. Scores:
command-path accuracy, flag F1, exact match, and the validator's pass rate; for docs the retrieval
recall@r (share of requests whose gold command is among the documented candidates) bounds path accuracy.
Nothing is tuned: budget, r and k are fixed in advance, so the val split is not used. Writes
``--out`` (results/tool_docs.json) and a plot beside it.

    python recipes/tool_docs.py [--limit 20 --model smollm2-135m --budget 768]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in rows]
    x = range(len(rows))
    for j, (key, label) in enumerate([("path_accuracy", "command path acc."), ("flag_f1", "flag F1"),
                                      ("exact_match", "exact match")]):
        a.bar([i + 0.27 * (j - 1) for i in x], [r["scores"][key] for r in rows], width=0.27, label=label)
    a.set_xticks(list(x), names, rotation=20)
    a.set_ylim(0, 1)
    a.set_title("accuracy by prompting mode")
    a.legend()
    docs = sorted((r for r in rows if r["mode"] == "docs" and not r["oracle"]), key=lambda r: r["n_docs"])
    rs = [r["n_docs"] for r in docs]
    b.plot(rs, [r["scores"]["path_accuracy"] for r in docs], "o-", label="docs: command path acc.")
    b.plot(rs, [r["scores"]["flag_f1"] for r in docs], "s-", label="docs: flag F1")
    b.plot(rs, [r["retrieval_recall"] for r in docs], "k--", label="retrieval recall@r (ceiling)")
    demos = next((r for r in rows if r["mode"] == "demos"), None)
    if demos:
        b.axhline(demos["scores"]["path_accuracy"], color="gray", ls=":", label="demos: command path acc.")
    b.set_xlabel("candidate commands documented (r)")
    b.set_ylim(0, 1)
    b.set_title("accuracy by number of candidate tools")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--man", default="/usr/share/man/man1/gcloud_*.1.gz")
    ap.add_argument("--catalog", default=None, help="an existing catalogue folder (skips ingestion)")
    ap.add_argument("--model", default="smollm2-135m", help="model spec or http://host:port/v1#model")
    ap.add_argument("--limit", type=int, default=20, help="test requests (fixed-seed sample)")
    ap.add_argument("--budget", type=int, default=768, help="prompt token budget")
    ap.add_argument("--n-demos", type=int, default=3)
    ap.add_argument("--docs-r", default="1,3,10", help="candidate counts for docs mode")
    ap.add_argument("--both-r", type=int, default=3)
    ap.add_argument("--oracle-r", default="1", help="docs with the gold command always shown first (ceiling "
                                                    "analysis; '' to skip)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/tool_docs.json")
    args = ap.parse_args()

    import torch

    from lmlab.io import write_json_atomic
    from lmlab.lm.backends import get_backend
    from lmlab.tools.cloud_cli import build_benchmark, validate
    from lmlab.tools.manpages import manpage_catalog
    from lmlab.tools.prompting import DemoPool, PromptConfig, evaluate_prompting
    from lmlab.tools.retrieve import BM25Retriever

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cat = manpage_catalog(args.man, catalog=args.catalog)
    bench = build_benchmark(cat)
    gold_valid = sum(validate(e.command, cat).ok for e in bench.examples) / len(bench.examples)
    test = bench.split("test")
    sample = random.Random(args.seed).sample(test, min(args.limit, len(test)))
    retriever = BM25Retriever(cat)
    pool = DemoPool(bench.split("train"))
    backend = get_backend(args.model)

    configs = [("demos", PromptConfig(mode="demos", n_demos=args.n_demos, budget=args.budget))]
    configs += [(f"docs@{r}", PromptConfig(mode="docs", n_docs=r, budget=args.budget))
                for r in map(int, args.docs_r.split(","))]
    configs.append((f"both@{args.both_r}", PromptConfig(mode="both", n_docs=args.both_r, n_demos=args.n_demos,
                                                        budget=args.budget)))
    configs += [(f"oracle@{r}", PromptConfig(mode="docs", n_docs=r, budget=args.budget, oracle=True))
                for r in map(int, filter(None, args.oracle_r.split(",")))]
    rows = []
    t_all = time.perf_counter()
    for name, config in configs:
        res = evaluate_prompting(backend, sample, cat, config=config, retriever=retriever, demo_pool=pool,
                                 max_tokens=args.max_tokens, progress=True)
        rows.append({"name": name, "mode": config.mode, "oracle": config.oracle,
                     "n_docs": config.n_docs if config.mode != "demos" else 0,
                     "n_demos": config.n_demos if config.mode != "docs" else 0, "scores": res.scores.to_json(),
                     "retrieval_recall": res.retrieval_recall, "seconds": res.seconds, "records": res.records})
        s = res.scores
        print(f"{name:8s} path {s.path_accuracy:.3f} flagF1 {s.flag_f1:.3f} exact {s.exact_match:.3f} "
              f"valid {s.valid_rate:.3f} recall {res.retrieval_recall} ({res.seconds:.0f}s)", flush=True)

    by = {r["name"]: r for r in rows}
    demos = by["demos"]["scores"]
    docs_name = f"docs@{args.both_r}" if f"docs@{args.both_r}" in by else next(
        r["name"] for r in rows if r["mode"] == "docs" and not r["oracle"])
    docs = by[docs_name]["scores"]
    wins = [docs[k] >= demos[k] for k in ("path_accuracy", "flag_f1")]
    verdict = "yes" if all(wins) else "partly" if any(wins) else "no"
    recall = by[docs_name]["retrieval_recall"]
    reason = (f"{docs_name} vs demos: path {docs['path_accuracy']:.2f} vs {demos['path_accuracy']:.2f}, flag F1 "
              f"{docs['flag_f1']:.2f} vs {demos['flag_f1']:.2f} on {len(sample)} test requests with a 135M model "
              f"(wide confidence intervals); the retrieval recall@{by[docs_name]['n_docs']} of {recall:.2f} caps docs' "
              f"path accuracy, and the model rarely copies a documented command verbatim")
    oracles = [r for r in rows if r["oracle"]]
    if oracles:
        o = oracles[0]
        reason += (f"; with the gold command's docs always shown ({o['name']}) path accuracy is "
                   f"{o['scores']['path_accuracy']:.2f} and exact match {o['scores']['exact_match']:.2f}: "
                   f"the ceiling of this 135M model given perfect retrieval")
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    summary = {
        "claim": "Tool documentation alone (zero-shot) matches or beats demonstrations (few-shot), "
                 "most with many tools",
        "paper": "LLM-Cloud CLI (2308.00675, Sec. 4): with retrieved docs, zero-shot doc prompting is on par with or "
                 "better than few-shot demos for ChatGPT/Codex; demos alone degrade as the toolset grows",
        "ours": "; ".join(f"{r['name']}: path {r['scores']['path_accuracy']:.2f}, "
                          f"flag F1 {r['scores']['flag_f1']:.2f}, exact {r['scores']['exact_match']:.2f}" for r in rows)
                + f" (SmolLM2-135M-Instruct, {len(sample)} test requests)",
        "command": "python recipes/tool_docs.py" + (f" --limit {args.limit}" if args.limit != 20 else ""),
        "reproduced": f"{verdict}: {reason}",
    }
    write_json_atomic(args.out, {
        "summary": summary,
        "config": vars(args),
        "benchmark": {**bench.stats(), "gold_commands_passing_validator": gold_valid},
        "rows": [{k: v for k, v in r.items() if k != "records"} for r in rows],
        "records": {r["name"]: r["records"] for r in rows},
        "per_seed": {str(args.seed): {r["name"]: r["scores"] for r in rows}},
        "plot": str(png),
        "seconds_total": time.perf_counter() - t_all,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                        "model": args.model, "cpus": os.cpu_count()},
    })
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
