"""ToolLLM's API retriever on the gcloud cloud-CLI benchmark: BM25 vs MiniLM vs MiniLM fine-tuned with MNR loss.

Claim (Qin et al. 2023, ToolLLM, arXiv 2307.16789, Sec. 2.2 "Neural API Retriever" and its retrieval
table): a Sentence-BERT retriever fine-tuned on (instruction, API document) pairs with the
multiple-negatives ranking loss ranks the relevant APIs far better (NDCG@1, NDCG@5) than BM25 and than
untuned embeddings.

Ours: the catalogue is every GA gcloud command (man pages of google-cloud-cli on this machine); queries
are the documentation's example requests; the split is by command group, so test commands are never
seen in training. Reports NDCG@1/3/5 and recall@1/3/5/10/20 on val and test for BM25 (bm25s),
all-MiniLM-L6-v2 + faiss, and the same encoder after MNR fine-tuning on the train pairs.

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
    ap.add_argument("--mnr-steps", type=int, default=60, help="MNR fine-tuning steps (0: skip fine-tuning)")
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
    if args.mnr_steps > 0:
        t0 = time.perf_counter()
        pairs = [(e.request, tool_document(cat[e.tool])) for e in splits["train"]]
        config = MNRConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_steps=args.mnr_steps,
                           seed=args.seed)
        mnr = finetune_mnr(dense.encoder, pairs, config, progress=True)
        tuned = DenseRetriever(cat, DenseConfig(max_seq_length=args.max_seq_length), encoder=dense.encoder,
                               progress=True)
        results["minilm_mnr"] = evaluate(tuned)
        timings["minilm_mnr"] = time.perf_counter() - t0
        print("minilm+mnr", results["minilm_mnr"]["test"])

    test = {k: v["test"] for k, v in results.items()}
    best = max(test, key=lambda k: test[k]["ndcg@1"])
    if "minilm_mnr" in test:
        beats_bm25 = test["minilm_mnr"]["ndcg@1"] > test["bm25"]["ndcg@1"]
        beats_base = test["minilm_mnr"]["ndcg@1"] > test["minilm"]["ndcg@1"]
        reproduced = "yes" if beats_bm25 and beats_base else "partly" if beats_bm25 or beats_base else "no"
        reason = (f"MNR fine-tuning moves NDCG@1 {test['minilm']['ndcg@1']:.3f} -> {test['minilm_mnr']['ndcg@1']:.3f} "
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
        "command": "python recipes/tool_retrieval.py" + (f" --mnr-steps {args.mnr_steps}" if args.mnr_steps != 60
                                                          else ""),
        "reproduced": f"{reproduced}: {reason}",
    }
    write_json_atomic(args.out, {
        "summary": summary,
        "config": vars(args),
        "benchmark": bench.stats(),
        "catalog": {"n_tools": len(cat), "source": args.catalog or args.man},
        "results": results,
        "best_on_test_ndcg@1": best,
        "mnr": {"steps": mnr.steps, "first_losses": mnr.losses[:5], "last_losses": mnr.losses[-5:]} if mnr else None,
        "seconds": timings,
        "per_seed": {str(args.seed): test},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
