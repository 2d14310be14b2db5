"""Does the pre-gate keep a MoE LM's quality? Conventional vs pre-gated MoE at the same size and budget.

Claim (Hwang et al. 2023, arXiv 2308.12066, "Pre-gated MoE"): letting block i's gate select block i+1's experts
(so the system can fetch them while block i runs) keeps the model's accuracy close to the conventional MoE
whose gate selects its own block's experts. The paper shows it on fine-tuned Switch Transformers; here both
variants of :class:`lmlab.moe.pregated.PreGatedMoEForCausalLM` are trained from scratch with the lmlab Trainer
on the same tokens, same seeds, same steps, and compared by test perplexity.

Data: the .txt/.md/.rst files under /usr/share/doc (capped); documents are split by a hash of their text into
test (``--test-fraction``) and the rest, which :func:`lmlab.lm.data.build_token_shards` splits again into train
and validation (the Trainer's eval loss). Nothing is tuned: both variants use the same settings; validation
loss is reported beside test perplexity.

    nice -n 10 python recipes/pregated.py [--steps 200 --seeds 0 1 --out results/pregated_quality.json]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.io import write_json_atomic
from lmlab.lm.data import TokenShards, build_token_shards, read_texts
from lmlab.lm.score import perplexity_of_texts
from lmlab.lm.tokenizer import train_bpe
from lmlab.lm.train import TrainConfig, Trainer
from lmlab.moe.pregated import build


def _is_test(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(b"test:" + text.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/doc", help="folder of .txt/.md/.rst/.jsonl text")
    ap.add_argument("--max-chars", type=int, default=6_000_000, help="cap on the text read")
    ap.add_argument("--max-doc-chars", type=int, default=60_000, help="cap per document (no single file dominates)")
    ap.add_argument("--test-fraction", type=float, default=0.05)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--expert-hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-test-tokens", type=int, default=60_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--out", default="results/pregated_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="lmlab-pregated-"))

    docs, total = [], 0
    for text in read_texts(args.data, min_chars=200):
        text = text[:args.max_doc_chars]
        docs.append(text)
        total += len(text)
        if total >= args.max_chars:
            break
    test_docs = [d for d in docs if _is_test(d, args.test_fraction)]
    train_docs = [d for d in docs if not _is_test(d, args.test_fraction)]
    tok = train_bpe(train_docs, vocab_size=args.vocab_size)
    folders = build_token_shards(train_docs, tok, work / "tokens", validation_fraction=0.05)
    train, val = TokenShards(folders["train"]), TokenShards(folders["validation"])
    print(f"{len(docs)} docs ({total / 1e6:.1f} M chars): train {train.n_tokens:,} tokens, "
          f"validation {val.n_tokens:,}, test docs {len(test_docs)}", file=sys.stderr)

    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
                      min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 20), eval_every=args.steps,
                      eval_batches=16, save_every=0, log_every=max(1, args.steps // 10))
    runs = []
    for seed in args.seeds:
        for variant in ("conventional", "pregated"):
            model = build(pregated=variant == "pregated", vocab_size=len(tok), seed=seed,
                          hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, expert_hidden_size=args.expert_hidden,
                          num_experts=args.experts, num_experts_per_tok=args.top_k,
                          max_position_embeddings=args.seq_len,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            t0 = time.perf_counter()
            trainer = Trainer(model, tok, train, TrainConfig(**{**cfg.__dict__, "seed": seed}),
                              work / f"{variant}-{seed}", validation=val, resume=False, progress=False)
            res = trainer.fit()
            train_s = time.perf_counter() - t0
            model.eval()
            ppl = perplexity_of_texts(model, tok, test_docs, window=args.seq_len, stride=args.seq_len // 2,
                                      batch_size=16)
            if ppl.n_tokens > args.max_test_tokens:  # cap: score the first max_test_tokens tokens only
                nll = ppl.token_nll[:args.max_test_tokens].double()
                test_ppl, n_test = math.exp(nll.mean().item()), args.max_test_tokens
            else:
                test_ppl, n_test = ppl.ppl, ppl.n_tokens
            row = {"variant": variant, "seed": seed, "test_ppl": test_ppl, "test_tokens": n_test,
                   "val_loss": res.eval_loss, "val_ppl": res.eval_ppl, "train_loss": res.train_loss,
                   "train_s": train_s, "params": sum(p.numel() for p in model.parameters()),
                   "active_params": model.num_active_parameters()}
            print(row, file=sys.stderr)
            runs.append(row)

        result = write_results(args, runs)  # after each seed: a partial result survives an interrupted run
    print(result["summary"]["ours"])


def write_results(args, runs: list[dict]) -> dict:
    """Summarise the completed (seed, variant) runs and write the JSON (called after every pair of runs)."""

    def mean(variant: str, key: str) -> float:
        xs = [r[key] for r in runs if r["variant"] == variant]
        return sum(xs) / len(xs)

    done = sorted({r["seed"] for r in runs if r["variant"] == "pregated"})
    conv, pre = mean("conventional", "test_ppl"), mean("pregated", "test_ppl")
    rel = pre / conv - 1
    per_seed = {s: next(r["test_ppl"] for r in runs if r["seed"] == s and r["variant"] == "pregated")
                / next(r["test_ppl"] for r in runs if r["seed"] == s and r["variant"] == "conventional") - 1
                for s in done}
    spread = max(per_seed.values()) - min(per_seed.values()) if len(per_seed) > 1 else None
    reproduced = "yes" if rel <= 0.03 else ("partly" if rel <= 0.10 else "no")
    why = (f"pre-gated test ppl {rel:+.1%} vs conventional (threshold +3%; per seed "
           f"{', '.join(f'{v:+.1%}' for v in per_seed.values())})")
    result = {
        "recipe": "pregated", "config": vars(args), "complete": len(done) == len(args.seeds),
        "runs": runs, "conventional_test_ppl": conv, "pregated_test_ppl": pre, "relative_change": rel,
        "per_seed_relative_change": per_seed, "seed_spread": spread,
        "paper": {"claim": "the pre-gate keeps the model quality of the conventional MoE (abstract: 'maintaining "
                           "the same model quality'; Switch Transformer fine-tuned on downstream tasks)",
                  "arxiv": "2308.12066"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "threads": args.threads},
        "summary": {
            "claim": "Pre-gated MoE keeps the quality of the conventional MoE at the same size (arXiv 2308.12066)",
            "paper": "same model quality (fine-tuned Switch Transformers, downstream tasks)",
            "ours": f"test ppl conventional {conv:.2f} vs pre-gated {pre:.2f} ({rel:+.1%}), "
                    f"{args.layers}x{args.hidden_size} LM, {args.experts} experts top-{args.top_k}, "
                    f"{args.steps} steps, {len(done)} of {len(args.seeds)} seeds",
            "command": f"`python recipes/pregated.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`",
            "reproduced": f"{reproduced}: {why}; tiny LMs trained from scratch on /usr/share/doc text, not the "
                          "paper's fine-tuned Switch Transformers",
        },
    }
    write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
