"""ToolLLM's API retriever on the gcloud cloud-CLI benchmark: BM25 vs MiniLM vs MiniLM fine-tuned with MNR loss.

Claim (Qin et al. 2023, ToolLLM, arXiv 2307.16789, Sec. 2.2 "Neural API Retriever" and its retrieval
table): a Sentence-BERT retriever fine-tuned on (instruction, API document) pairs with the
multiple-negatives ranking loss ranks the relevant APIs far better (NDCG@1, NDCG@5) than BM25 and than
untuned embeddings.

Ours: the catalogue is every GA gcloud command (man pages of google-cloud-cli on this machine); queries
are the documentation's example requests; the split is by command group, so test commands are never
seen in training. Reports NDCG@1/3/5 and recall@1/3/5/10/20 on val and test for BM25 (bm25s),
all-MiniLM-L6-v2 + faiss, and the same encoder after MNR fine-tuning on the train pairs. ``--mnr-steps``
may list several step counts ("60,120"): one fine-tuning run of the largest count (its warmup/decay
schedule spans all of it) is evaluated after each listed step, and the checkpoint with the best val
NDCG@1 is reported as ``minilm_mnr`` (early stopping on val; the test split never chooses); every
checkpoint's val and test numbers are kept.

    python recipes/tool_retrieval.py [--mnr-steps 60 --batch-size 32 --dense-index DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--man", default="/usr/share/man/man1/gcloud_*.1.gz", help="man pages to ingest")
    ap.add_argument("--catalog", default=None, help="an existing catalogue folder (skips ingestion)")
    ap.add_argument("--mnr-steps", default="60",
                    help="MNR fine-tuning steps, or a comma list chosen among on val (0: skip fine-tuning)")
    ap.add_argument("--dense-index", default=None,
                    help="folder caching the untuned MiniLM embeddings of the catalogue (built if missing)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/tool_retrieval.json")
    args = ap.parse_args()

    import numpy as np
    import torch

    from lmlab.io import write_json_atomic
    from lmlab.tools.cloud_cli import build_benchmark
    from lmlab.tools.manpages import manpage_catalog
    from lmlab.tools.retrieve import (
        BM25Retriever,
        DenseConfig,
        DenseRetriever,
        MNRConfig,
        evaluate_retrieval,
        finetune_mnr,
        tool_document,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    cat = manpage_catalog(args.man, catalog=args.catalog)
    bench = build_benchmark(cat)
    splits = {s: bench.split(s) for s in ("train", "val", "test")}
    print(f"catalogue: {len(cat)} commands; benchmark: {bench.stats()}")

    def evaluate(retriever) -> dict:
        return {s: evaluate_retrieval(retriever, cat, [e.request for e in splits[s]], [e.tool for e in splits[s]])
                .to_json() for s in ("val", "test")}

    results, timings = {}, {}
    t0 = time.perf_counter()
    results["bm25"] = evaluate(BM25Retriever(cat))
    timings["bm25"] = time.perf_counter() - t0
    print("bm25", results["bm25"]["test"])

    t0 = time.perf_counter()
    if args.dense_index and Path(args.dense_index, "manifest.json").is_file():
        dense = DenseRetriever.load(args.dense_index, cat)
    else:
        dense = DenseRetriever(cat, DenseConfig(max_seq_length=args.max_seq_length), progress=True)
        if args.dense_index:
            dense.save(args.dense_index)
    results["minilm"] = evaluate(dense)
    timings["minilm"] = time.perf_counter() - t0
    print("minilm", results["minilm"]["test"])

    mnr = None
    step_choices = [int(x) for x in str(args.mnr_steps).split(",") if int(x) > 0]
    candidates = {}
    if step_choices:
        pairs = [(e.request, tool_document(cat[e.tool])) for e in splits["train"]]
        t0 = time.perf_counter()

        def checkpoint(step: int) -> None:
            tuned = DenseRetriever(cat, DenseConfig(max_seq_length=args.max_seq_length), encoder=dense.encoder,
                                   progress=True)
            candidates[step] = {"metrics": evaluate(tuned), "seconds": time.perf_counter() - t0}
            print(f"minilm+mnr after {step} steps: val {candidates[step]['metrics']['val']}", flush=True)

        config = MNRConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_steps=max(step_choices),
                           seed=args.seed)
        mnr = finetune_mnr(dense.encoder, pairs, config, progress=True, checkpoints=tuple(step_choices),
                           on_checkpoint=checkpoint)
        if max(step_choices) not in candidates:  # fewer batches than asked for: evaluate where training ended
            checkpoint(mnr.steps)
        chosen = max(candidates, key=lambda k: candidates[k]["metrics"]["val"]["ndcg@1"])  # val decides
        results["minilm_mnr"] = candidates[chosen]["metrics"]
        timings["minilm_mnr"] = candidates[chosen]["seconds"]
        print("minilm+mnr", chosen, "steps (chosen on val):", results["minilm_mnr"]["test"])

    test = {k: v["test"] for k, v in results.items()}
    best = max(test, key=lambda k: test[k]["ndcg@1"])
    if "minilm_mnr" in test:
        beats_bm25 = test["minilm_mnr"]["ndcg@1"] > test["bm25"]["ndcg@1"]
        beats_base = test["minilm_mnr"]["ndcg@1"] > test["minilm"]["ndcg@1"]
        reproduced = "yes" if beats_bm25 and beats_base else "partly" if beats_bm25 or beats_base else "no"
        reason = (f"MNR fine-tuning ({chosen} steps, chosen on val NDCG@1 among checkpoints {list(candidates)} of "
                  f"one {mnr.steps}-step run) moves NDCG@1 "
                  f"{test['minilm']['ndcg@1']:.3f} -> {test['minilm_mnr']['ndcg@1']:.3f} "
                  f"(BM25 {test['bm25']['ndcg@1']:.3f}); gcloud requests share many words with the command names, "
                  f"so BM25 is a much stronger baseline here than on ToolBench's RapidAPI instructions")
    else:
        reproduced, reason = "no", "fine-tuning skipped (--mnr-steps 0)"
    summary = {
        "claim": "A bi-encoder fine-tuned with multiple-negatives ranking loss retrieves the right API better "
                 "(NDCG@1/5) than BM25 and untuned embeddings",
        "paper": "ToolLLM (2307.16789): fine-tuned Sentence-BERT retriever well above BM25 and Ada embeddings "
                 "on NDCG@1/@5 over 16k RapidAPI APIs",
        "ours": "; ".join(f"{k}: NDCG@1 {v['ndcg@1']:.3f}, NDCG@5 {v['ndcg@5']:.3f}, recall@5 {v['recall@5']:.3f}"
                          for k, v in test.items()) + f" (test, {len(splits['test'])} requests, {len(cat)} commands)",
        "command": "python recipes/tool_retrieval.py" + (f" --mnr-steps {args.mnr_steps}"
                                                          if str(args.mnr_steps) != "60" else ""),
        "reproduced": f"{reproduced}: {reason}",
    }
    write_json_atomic(args.out, {
        "summary": summary,
        "config": vars(args),
        "benchmark": bench.stats(),
        "catalog": {"n_tools": len(cat), "source": args.catalog or args.man},
        "results": results,
        "best_on_test_ndcg@1": best,
        "mnr": {"steps": mnr.steps, "chosen_steps": chosen, "chosen_on": "val ndcg@1",
                "first_losses": mnr.losses[:5], "last_losses": mnr.losses[-5:],
                "checkpoints": {str(k): {**v["metrics"], "seconds": v["seconds"]} for k, v in candidates.items()}}
        if mnr else None,
        "seconds": timings,
        "per_seed": {str(args.seed): test},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
