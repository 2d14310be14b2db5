"""The substrate's end-to-end demo (`lmlab lm demo`): text found on this machine -> tokenizer -> tiny LM.

1. Collect documentation text installed on this machine (``/usr/share/doc``: READMEs, guides, ``.md``,
   ``.txt``, ``.rst``; changelogs, copyright files, tables and non-prose files skipped; at most 200k
   characters a file), capped at ``max_mb``.
2. Train a byte-level BPE tokenizer on it, tokenize into train/validation shards.
3. Measure validation perplexity of a randomly initialised ``tiny:7m`` Llama, train it for ``steps``
   steps (about 2 minutes on 2 cores at the defaults), measure again, and sample from it.

Everything lands in ``out`` and each stage is skipped when its output already exists, so an
interrupted demo resumes where it stopped (the Trainer resumes from its last checkpoint).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lmlab.errors import ConfigError, DataError

DOC_ROOT = Path("/usr/share/doc")
SKIP = ("changelog", "copyright", "news.debian", "license")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/lm-demo"
    source: str = str(DOC_ROOT)  # any folder of text works
    max_mb: float = 4.0  # text to collect; 4 MB tokenizes in seconds and is ~1M BPE tokens
    vocab_size: int = 4096
    preset: str = "7m"  # tiny:<preset> architecture, random init
    steps: int = 150  # ~2 minutes at batch 16 x 256 on 2 cores
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    eval_tokens: int = 32768  # validation tokens scored before/after (sliding window)
    seed: int = 0

    def __post_init__(self):  # checked before any text is collected or a tokenizer trained
        from lmlab.lm.models import TINY_PRESETS

        if not 0 < self.max_mb < math.inf:  # NaN fails every comparison
            raise ConfigError(f"max_mb must be positive and finite, not {self.max_mb}")
        if self.preset not in TINY_PRESETS:
            raise ConfigError(f"unknown tiny preset {self.preset!r}; choose one of {', '.join(TINY_PRESETS)}")
        self.train_config()  # steps, seq_len, batch_size, lr, seed

    def train_config(self) -> "TrainConfig":  # noqa: F821
        from lmlab.lm.train import TrainConfig

        return TrainConfig(seq_len=self.seq_len, batch_size=self.batch_size, max_steps=self.steps, lr=self.lr,
                           min_lr=self.lr / 10, warmup_steps=max(1, self.steps // 20), eval_every=0,
                           save_every=max(1, self.steps // 3), log_every=max(1, self.steps // 30), seed=self.seed)


MAX_FILE_CHARS = 200_000  # no single file may dominate the demo's few MB (the DejaVu status table is 1.5 MB)
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")  # ANSI escapes, control characters
_BLANK_RUNS = re.compile(r"\n\s*\n(\s*\n)+")  # three or more line breaks -> one blank line
_TABLE_LINE = re.compile(r"\S {4,}\S|U\+[0-9A-F]{4}|[│┃|]")


def _prose_ratio(text: str) -> float:
    """Share of letters, spaces and common punctuation: a cheap filter for prose."""
    prose = sum(c.isalpha() or c in " .,;:'\"()-\n" for c in text)
    return prose / max(1, len(text))


def _table_ratio(text: str) -> float:
    """Share of non-empty lines that look like table rows (aligned columns, code points, box drawing)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return sum(bool(_TABLE_LINE.search(line)) for line in lines) / max(1, len(lines))


def machine_texts(root: str | Path = DOC_ROOT, *, max_bytes: int) -> Iterator[str]:
    """Documentation text under ``root`` (plain or .gz), in path order, until ``max_bytes`` are collected."""
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"{root} {problem}; pass --source with a folder of text files")
    total = 0
    for p in sorted(root.rglob("*")):
        name = p.name.lower()
        if not p.is_file() or any(s in name for s in SKIP):
            continue
        base = name[:-3] if name.endswith(".gz") else name
        if not (base.startswith("readme") or base.endswith((".md", ".txt", ".rst"))):
            continue
        try:
            raw = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if len(text) < 200 or _prose_ratio(text) < 0.75 or _table_ratio(text) > 0.3:  # tables, charts, ASCII art
            continue
        text = _BLANK_RUNS.sub("\n\n", _CONTROL.sub("", text[:MAX_FILE_CHARS]))
        total += len(raw)
        yield text
        if total >= max_bytes:
            return


def run(cfg: DemoConfig, *, echo=print) -> dict:
    """Run the demo; returns (and writes to ``out/demo.json``) the before/after perplexities and a sample."""
    import torch

    from lmlab.io import write_json_atomic
    from lmlab.lm import data, models, score, tokenizer
    from lmlab.lm.train import Trainer

    out = Path(cfg.out)
    tok_dir, shard_dir = out / "tokenizer", out / "tokens"
    t0 = time.perf_counter()
    if not (tok_dir / "tokenizer.json").is_file():
        echo(f"[1/4] training a {cfg.vocab_size}-token BPE tokenizer on up to {cfg.max_mb} MB from {cfg.source}")
        texts = list(machine_texts(cfg.source, max_bytes=int(cfg.max_mb * 1e6)))
        tokenizer.train_bpe(texts, vocab_size=cfg.vocab_size, out_dir=tok_dir)
    tok = tokenizer.load(tok_dir)
    # both splits: an interrupt between their two renames leaves one in place
    if not all((shard_dir / split / "manifest.json").is_file() for split in data.SPLITS):
        echo("[2/4] tokenizing into train/validation shards")
        texts = machine_texts(cfg.source, max_bytes=int(cfg.max_mb * 1e6))
        data.build_token_shards(texts, tok, shard_dir, validation_fraction=0.05, source=cfg.source)
    train, val = data.TokenShards(shard_dir / "train"), data.TokenShards(shard_dir / "validation")
    echo(f"      {train.n_tokens:,} training tokens, {val.n_tokens:,} validation tokens")

    if val.n_tokens <= cfg.seq_len:
        raise DataError(f"only {val.n_tokens} validation tokens: give --source more text or raise --max-mb")
    val_ids = torch.from_numpy(val.shards[0][: cfg.eval_tokens].astype("int64"))

    def val_ppl(model) -> float:
        return score.perplexity(model, val_ids, window=cfg.seq_len, stride=cfg.seq_len // 2).ppl

    loaded = models.load(f"tiny:{cfg.preset}", tokenizer=tok, seed=cfg.seed)
    before = val_ppl(loaded.model)
    echo(f"[3/4] tiny:{cfg.preset} ({loaded.num_parameters / 1e6:.1f} M params): validation perplexity "
         f"before training {before:,.1f}; training {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens")
    trainer = Trainer(loaded.model, tok, train, cfg.train_config(), out / "run", validation=val)
    trainer.fit()
    model = trainer.model.eval()
    after = val_ppl(model)
    prompt = "The "
    ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                             pad_token_id=tok.pad_token_id)
    sample = tok.decode(gen[0], skip_special_tokens=True)
    echo(f"[4/4] validation perplexity after training {after:,.1f} (before {before:,.1f}; "
         f"uniform over the vocabulary would be {len(tok):,})")
    echo(f"      sample: {sample!r}")
    result = {"config": asdict(cfg), "params": loaded.num_parameters, "train_tokens": train.n_tokens,
              "val_ppl_before": before, "val_ppl_after": after, "uniform_ppl": len(tok), "sample": sample,
              "steps": trainer.step, "seconds": time.perf_counter() - t0,
              "model": str(out / "run" / "model")}
    write_json_atomic(out / "demo.json", result)
    echo(f"      model: {out / 'run' / 'model'} (load it with lmlab.lm.models.load); summary: {out / 'demo.json'}")
    return json.loads(json.dumps(result))
