"""CLI for the LM substrate: `lmlab models ...` and `lmlab lm ...`."""

from __future__ import annotations

import click

from lmlab.cli import MAX_THREADS, at_least, thread_count


@click.group("models")
def models_group():
    """Models that load here: named packaged models, tiny presets, or any local HF folder."""


@models_group.command("ls")
def models_ls():
    """Show each named model and tiny preset and whether it is installed here."""
    from rich.console import Console
    from rich.table import Table

    from lmlab.lm import models

    table = Table()
    for col in ("name", "available", "description", "licence", "install"):
        table.add_column(col, overflow="fold")
    for row in models.listing():
        table.add_row(row["name"], "yes" if row["available"] else "no", row["description"], row["licence"],
                      row["install"])
    Console(width=160).print(table)


@click.group("lm")
def lm_group():
    """The LM substrate: tokenizers, training, perplexity, and the end-to-end demo."""


@lm_group.command("tokenizer")
@click.option("--data", "data_path", required=True, type=click.Path(), help="File or folder of text (.txt/.md/.jsonl).")
@click.option("--vocab-size", default=8192, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Folder to write the HF tokenizer to.")
def tokenizer_cmd(data_path, vocab_size, out):
    """Train a byte-level BPE tokenizer on your text."""
    from lmlab.lm import data, tokenizer

    tok = tokenizer.train_bpe(data.read_texts(data_path), vocab_size=vocab_size, out_dir=out)
    click.echo(f"wrote {out} (vocabulary {len(tok)})")


@lm_group.command("tokenize")
@click.option("--data", "data_path", required=True, type=click.Path(), help="File or folder of text (.txt/.md/.jsonl).")
@click.option("--tokenizer", "tok_spec", required=True,
              help="A tokenizer folder, or a model spec whose tokenizer to use (e.g. smollm2-135m).")
@click.option("--out", required=True, type=click.Path(), help="Folder for train/ and validation/ shards.")
@click.option("--validation-fraction", default=0.05, show_default=True)
def tokenize_cmd(data_path, tok_spec, out, validation_fraction):
    """Tokenize text into train/validation token shards for `lmlab lm train`."""
    from lmlab.lm import data

    data.check_validation_fraction(validation_fraction)  # before loading a model for its tokenizer
    tok = _load_tokenizer(tok_spec)
    folders = data.build_token_shards(data.read_texts(data_path), tok, out, validation_fraction=validation_fraction,
                                      source=str(data_path))
    for split, folder in folders.items():
        m = data.TokenShards(folder).manifest
        click.echo(f"{split}: {m['documents']} documents, {m['tokens']} tokens -> {folder}")


def _load_tokenizer(spec: str):
    from pathlib import Path

    from lmlab.lm import models, tokenizer

    if Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
        return tokenizer.load(spec)
    return models.load(spec).tokenizer


@lm_group.command("train")
@click.option("--model", "model_spec", required=True,
              help="tiny:<preset> (random init), a named model, or a HF folder (e.g. another run's model/).")
@click.option("--tokenizer", "tok_dir", default=None, type=click.Path(),
              help="Tokenizer folder for tiny:* models (default: the byte-level tokenizer).")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Output of `lmlab lm tokenize`.")
@click.option("--out", required=True, type=click.Path(), help="Run folder; an existing run there is resumed.")
@click.option("--steps", "max_steps", default=1000, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Windows per micro-batch, per process.")
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--min-lr", default=1e-4, show_default=True)
@click.option("--warmup", "warmup_steps", default=100, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant", "rewarm"]), default="cosine", show_default=True)
@click.option("--rewarm-start-lr", default=0.0, show_default=True)
@click.option("--eval-every", default=100, show_default=True)
@click.option("--save-every", default=200, show_default=True)
@click.option("--log-every", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, callback=thread_count,
              help=f"torch threads per process (0: torch's default; at most {MAX_THREADS}).")
@click.option("--no-resume", is_flag=True, help="Refuse to continue an existing run in --out.")
def train_cmd(model_spec, tok_dir, data_dir, out, threads, no_resume, **cfg):
    """Train a causal LM on token shards (resumable; runs under torchrun for DDP)."""
    from pathlib import Path

    import torch

    from lmlab.errors import ConfigError
    from lmlab.lm import data, models, tokenizer
    from lmlab.lm.train import TrainConfig, Trainer, latest_checkpoint, shutdown_distributed

    config = TrainConfig(**cfg)  # checked before anything loads
    if threads:
        torch.set_num_threads(threads)
    if no_resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run; drop --no-resume to continue it, or pick another --out")
    tok = tokenizer.load(tok_dir) if tok_dir else None
    loaded = models.load(model_spec, tokenizer=tok, seed=config.seed)
    train_dir, val_dir = Path(data_dir) / "train", Path(data_dir) / "validation"
    validation = data.TokenShards(val_dir) if (val_dir / "manifest.json").is_file() else None
    trainer = Trainer(loaded.model, loaded.tokenizer, data.TokenShards(train_dir), config, out,
                      validation=validation, resume=True)
    if trainer.step and trainer.dist.is_main:
        click.echo(f"resuming {out} from step {trainer.step}")
    try:
        result = trainer.fit()
    finally:
        shutdown_distributed()
    if trainer.dist.is_main:
        ppl = f", validation ppl {result.eval_ppl:.2f}" if result.eval_ppl else ""
        click.echo(f"step {result.step}: train loss {result.train_loss:.4f}{ppl}; model in {Path(out) / 'model'}")


@lm_group.command("demo")
@click.option("--out", default="runs/lm-demo", show_default=True, type=click.Path())
@click.option("--source", default="/usr/share/doc", show_default=True, type=click.Path(),
              help="Folder of text to learn from.")
@click.option("--max-mb", default=4.0, show_default=True)
@click.option("--steps", default=150, show_default=True, help="Training steps (~2 minutes at the default).")
@click.option("--preset", default="7m", show_default=True,
              help="The tiny:<preset> architecture: micro, small or 7m (the tiny: prefix is optional).")
@click.option("--seed", default=0, show_default=True)
def demo_cmd(out, source, max_mb, steps, preset, seed):
    """End to end on this machine's text: tokenizer, tiny LM, perplexity before/after, a sample."""
    from lmlab.lm.demo import DemoConfig, run

    run(DemoConfig(out=out, source=source, max_mb=max_mb, steps=steps, preset=preset.removeprefix("tiny:"), seed=seed),
        echo=click.echo)


@lm_group.command("perplexity")
@click.option("--model", "model_spec", required=True, help="A model spec (HF folder, named model, tiny:*).")
@click.option("--data", "data_path", required=True, type=click.Path(), help="File or folder of text (.txt/.md/.jsonl).")
@click.option("--window", default=1024, show_default=True, help="Tokens the model sees per window (SILO: 1024).")
@click.option("--stride", default=512, show_default=True, help="Tokens scored per window after the first (SILO: 512).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-docs", default=0, callback=at_least(0), help="Score only the first N documents (0: all).")
def perplexity_cmd(model_spec, data_path, window, stride, batch_size, max_docs):
    """Sliding-window perplexity of any causal LM on your text (documents joined by EOS)."""
    import itertools

    from lmlab.lm import data, models, score

    loaded = models.load(model_spec)
    texts = data.read_texts(data_path)
    texts = list(itertools.islice(texts, max_docs) if max_docs else texts)
    window = min(window, getattr(loaded.model.config, "max_position_embeddings", window))
    stride = min(stride, window)
    r = score.perplexity_of_texts(loaded.model, loaded.tokenizer, texts, window=window, stride=stride,
                                  batch_size=batch_size, progress=True)
    click.echo(f"{model_spec}: perplexity {r.ppl:.3f} over {r.n_tokens:,} tokens ({len(texts)} documents, "
               f"window {window}, stride {stride})")
