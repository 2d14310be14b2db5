"""Trainer throughput vs a bare hand-written training loop, same model, batch and optimizer, one process.

The bare loop is what anyone would write: fixed pre-built batch, forward, cross-entropy, backward,
clip, AdamW step, zero_grad. Ours is ``Trainer.fit`` with its data sampling from memory-mapped shards,
LR schedule, metric logging and the checkpoint it writes when it stops. Rounds alternate (bare, ours,
bare, ours, ...) and medians are compared, so machine noise hits both. Target: ratio >= 0.90.

    python benchmarks/trainer.py [--preset 7m --seq-len 256 --batch-size 16 --steps 8 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.io import write_json_atomic
from lmlab.lm import models, tokenizer
from lmlab.lm.data import TokenShards, build_token_shards
from lmlab.lm.train import TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default="results/bench_trainer.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = tokenizer.byte_tokenizer()
    g = torch.Generator().manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lmlab-bench-"))
    # random bytes as text: the benchmark measures the loop, not what is learnt
    texts = ["".join(chr(32 + int(c)) for c in torch.randint(0, 90, (4000,), generator=g)) for _ in range(64)]
    folders = build_token_shards(texts, tok, work / "tok", validation_fraction=0.0)
    shards = TokenShards(folders["train"])
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, max_steps=10**6, warmup_steps=10,
                      eval_every=0, save_every=0, log_every=args.steps, grad_clip=1.0)

    bare_model = models.load(f"tiny:{args.preset}", seed=0).model.train()
    opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    fixed = shards.sample(args.seq_len, args.batch_size, seed=0, step=0, micro=0)

    def bare_round() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            logits = bare_model(input_ids=fixed.input_ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), fixed.labels.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    m = models.load(f"tiny:{args.preset}", seed=0)
    trainer = Trainer(m.model, m.tokenizer, shards, cfg, work / "run", progress=False)

    def ours_round() -> float:
        t0 = time.perf_counter()
        trainer.fit(until_step=trainer.step + args.steps)
        return time.perf_counter() - t0

    bare_round(), ours_round()  # warm-up (allocator, first checkpoint folder)
    bare_t, ours_t = [], []
    for _ in range(args.rounds):
        bare_t.append(bare_round())
        ours_t.append(ours_round())
    tokens = args.steps * args.seq_len * args.batch_size
    bare_tps, ours_tps = tokens / statistics.median(bare_t), tokens / statistics.median(ours_t)
    ratio = ours_tps / bare_tps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny:{args.preset} "
          f"({m.num_parameters / 1e6:.1f} M params), batch {args.batch_size} x {args.seq_len}")
    print(f"bare loop: {bare_tps:,.0f} tokens/s   Trainer: {ours_tps:,.0f} tokens/s")
    print(f"trainer throughput ratio: {ratio:.2f} (target >= 0.90)")
    result = {"benchmark": "trainer", "config": vars(args), "bare_tokens_per_s": bare_tps,
              "trainer_tokens_per_s": ours_tps, "ratio": ratio, "target": 0.90,
              "bare_round_s": bare_t, "trainer_round_s": ours_t,
              "summary": {"claim": "`lm.train.Trainer` throughput vs a bare training loop (issue 2)",
                          "paper": ">= 0.90", "ours": f"{ratio:.2f} ({ours_tps:,.0f} vs {bare_tps:,.0f} tokens/s)",
                          "command": "`python benchmarks/trainer.py`", "reproduced": "yes" if ratio >= 0.90 else "no"},
              "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                      "cpus": os.cpu_count()}}
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
