"""Sliding-window perplexity throughput: ``lmlab.lm.score.perplexity`` vs a bare batched loop, one process.

The bare loop is the minimum anyone would write for the same windows: input/target batches built before
timing, then per batch ``model(x).logits``, float32 ``log_softmax``, ``gather`` of the targets and a masked
sum, under ``torch.no_grad``. Ours is ``perplexity`` (window planning, batching, per-token NLL, result).
Rounds alternate (bare, ours, bare, ours, ...) after one warm-up each and medians are compared, so machine
noise hits both. Target: ratio >= 0.90. Writes ``--out`` (default results/bench_score.json).

    python benchmarks/score.py [--model tiny:7m --tokens 8192 --window 256 --stride 256 --batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lmlab.io import write_json_atomic
from lmlab.lm import models
from lmlab.lm.score import Window, perplexity, sliding_windows

TARGET = 0.90


def bare_batches(ids: torch.Tensor, windows: list[Window], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """(inputs (b, L), targets (b, L), scored mask (b, L)) per batch of windows; the last window right-padded."""
    batches = []
    for start in range(0, len(windows), batch_size):
        group = windows[start:start + batch_size]
        length = max(w.n_inputs for w in group)
        x = torch.stack([F.pad(ids[w.inputs], (0, length - w.n_inputs)) for w in group])
        y = torch.stack([F.pad(ids[w.begin + 1:w.end], (0, length - w.n_inputs)) for w in group])
        pos = torch.arange(length)
        mask = torch.stack([(pos >= w.score_from - 1 - w.begin) & (pos < w.n_inputs) for w in group])
        batches.append((x, y, mask))
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:7m", help="model spec for lmlab.lm.models.load")
    ap.add_argument("--tokens", type=int, default=8192, help="length of the (random) token sequence")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of each, alternating")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default="results/bench_score.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = models.load(args.model, seed=0)
    model = loaded.model
    ids = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    windows = sliding_windows(args.tokens, window=args.window, stride=args.stride)
    batches = bare_batches(ids, windows, args.batch_size)
    n_scored = args.tokens - 1

    def bare_round() -> tuple[float, float]:
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for x, y, mask in batches:
                logprobs = torch.log_softmax(model(x).logits.float(), dim=-1)
                token_lp = logprobs.gather(-1, y[..., None]).squeeze(-1)
                total -= token_lp[mask].double().sum()
        return time.perf_counter() - t0, total.item()

    def ours_round() -> tuple[float, float]:
        t0 = time.perf_counter()
        result = perplexity(model, ids, window=args.window, stride=args.stride, batch_size=args.batch_size)
        return time.perf_counter() - t0, result.nll

    (_, bare_nll), (_, ours_nll) = bare_round(), ours_round()  # warm-up; also checks both compute the same
    bare_t, ours_t = [], []
    for _ in range(args.repeats):
        bare_t.append(bare_round()[0])
        ours_t.append(ours_round()[0])
    bare_tps, ours_tps = n_scored / statistics.median(bare_t), n_scored / statistics.median(ours_t)
    ratio = ours_tps / bare_tps
    agree = abs(bare_nll - ours_nll) <= 1e-4 * abs(bare_nll)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} "
          f"({loaded.num_parameters / 1e6:.1f} M params), {args.tokens} tokens, window {args.window}, "
          f"stride {args.stride}, batch {args.batch_size}, {len(windows)} windows, {args.repeats} repeats")
    print(f"bare loop: {bare_tps:,.0f} tokens/s   perplexity(): {ours_tps:,.0f} tokens/s   "
          f"NLL bare {bare_nll:.4f} vs ours {ours_nll:.4f} ({'agree' if agree else 'DIFFER'})")
    print(f"score throughput ratio: {ratio:.2f} (target >= {TARGET:.2f})")
    write_json_atomic(args.out, {
        "benchmark": "score", "config": vars(args), "n_windows": len(windows), "n_scored_tokens": n_scored,
        "bare_tokens_per_s": bare_tps, "ours_tokens_per_s": ours_tps, "ratio": ratio, "target": TARGET,
        "bare_round_s": bare_t, "ours_round_s": ours_t, "bare_nll": bare_nll, "ours_nll": ours_nll,
        "nll_agree": agree,
        "summary": {"claim": "`lm.score.perplexity` throughput vs bare batched forward passes (issue 2)",
                    "paper": f">= {TARGET:.2f}", "ours": f"{ratio:.2f} ({ours_tps:,.0f} vs {bare_tps:,.0f} tokens/s)",
                    "command": "`python benchmarks/score.py`", "reproduced": "yes" if ratio >= TARGET else "no"},
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "cpus": os.cpu_count()},
    })


if __name__ == "__main__":
    main()
