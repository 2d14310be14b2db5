"""`lmlab tools`: ingest API catalogues, show and retrieve tools, validate commands, run the cloud-CLI benchmark."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from lmlab.cli import MAX_THREADS, at_least, thread_count
from lmlab.errors import ConfigError

DEFAULT_MAN = "/usr/share/man/man1/gcloud_*.1.gz"
PROMPT_MODES = ("none", "demos", "docs", "both")  # lmlab.tools.prompting.MODES, without importing it
MODE_HELP = ("none: the request alone (zero-shot baseline); demos: k train examples (few-shot); docs: the "
             "retrieved commands' documentation (zero-shot); both: demos + docs (few-shot)")


class _EchoHandler(logging.Handler):
    """Log records as ``lmlab: warning: ...`` lines on whatever stderr is current (click.echo)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"lmlab: warning: {record.getMessage()}", err=True)


def _warnings_to_stderr() -> None:
    """Show the ingesters' warnings (e.g. a skipped damaged man page) as one line each."""
    logger = logging.getLogger("lmlab.tools")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.propagate = False
    logger.setLevel(logging.WARNING)


def _check_license(text: str) -> str:
    """--license as its SPDX expression ('apache 2.0' -> 'Apache-2.0'); '' stays '' (the source's own). A name
    lmlab cannot classify is refused unless it is an SPDX ``LicenseRef-`` (a licence of your own)."""
    if not text:
        return ""
    from lmlab.corpus.licenses import LicenseClass, classify

    lic = classify(text)
    if lic.license_class == LicenseClass.UNKNOWN and not text.startswith("LicenseRef-"):
        raise ConfigError(f"--license {text!r} is not a licence lmlab recognises: give an SPDX expression (e.g. "
                          "Apache-2.0, CC-BY-4.0) or LicenseRef-NAME for a licence of your own")
    return lic.expression if lic.license_class != LicenseClass.UNKNOWN else text


def _check_request(ctx, param, value: str) -> str:
    if not value.strip():
        raise ConfigError(f"{param.human_readable_name} is empty: say what the tool should do")
    return value


def _check_mode(ctx, param, value):
    """--mode as a plain string, so that a wrong one is an LmlabError (one line, exit 2), not a usage dump."""
    if value not in PROMPT_MODES:
        raise ConfigError(f"unknown --mode {value!r}: use one of {', '.join(PROMPT_MODES)}")
    return value


@click.group("tools")
def tools_group():
    """Tool use: API catalogues, retrieval, tool-documentation prompting (arXiv 2308.00675, 2307.16789)."""


@tools_group.command("ingest")
@click.argument("kind", type=click.Choice(["manpages", "discovery", "openapi"]))
@click.argument("paths", nargs=-1)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="catalogue folder to write")
@click.option("--tracks", default="ga", show_default=True,
              help="man pages: comma-separated gcloud release tracks to keep (ga,beta,alpha)")
@click.option("--include-groups", is_flag=True, help="man pages: keep command-group pages too")
@click.option("--license", "license_", default="", help="SPDX licence of the documentation (default: per source)")
def ingest_command(kind, paths, out, tracks, include_groups, license_):
    """Build a catalogue from man pages (default: the gcloud reference), discovery documents
    (default: those bundled with google-api-python-client) or OpenAPI 3 specs (files or folders)."""
    _warnings_to_stderr()
    license_ = _check_license(license_)
    if kind == "manpages":
        from lmlab.tools.manpages import ingest_manpages

        paths = list(paths) or [DEFAULT_MAN]
        tools = ingest_manpages(paths, tracks=tuple(t.strip() for t in tracks.split(",")),
                                include_groups=include_groups, license=license_ or "Apache-2.0", progress=True)
    elif kind == "discovery":
        from lmlab.tools.discovery import ingest_discovery

        tools = ingest_discovery(list(paths) or None, progress=True)
    else:
        from lmlab.tools.openapi import ingest_openapi

        if not paths:
            raise ConfigError("give OpenAPI spec files or folders to ingest")
        tools = ingest_openapi(list(paths), license=license_)
    from lmlab.tools.catalog import save_catalog

    cat = save_catalog(tools, out, info={"source": kind, "inputs": list(paths), "tracks": tracks,
                                         "include_groups": include_groups})
    click.echo(f"wrote {out}: {len(cat)} tools, {cat.manifest['n_examples']} examples")


@tools_group.command("show")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the record as JSON")
def show_command(catalog, name, as_json):
    """Print one tool's documentation (NAME: "gcloud compute instances create", "compute.instances.insert")."""
    from lmlab.tools.catalog import load_catalog

    tool = load_catalog(catalog, verify=False)[name]
    click.echo(json.dumps(tool.to_json(), indent=2) if as_json else tool.render())


@tools_group.command("retrieve")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.argument("request", callback=_check_request)
@click.option("--method", type=click.Choice(["bm25", "dense"]), default="bm25", show_default=True)
@click.option("-k", default=5, show_default=True, callback=at_least(1), help="results to show")
@click.option("--index", type=click.Path(file_okay=False), default=None,
              help="dense: folder caching the embeddings (built on first use)")
@click.option("--model", default=None, help="dense: sentence-transformers folder (default all-MiniLM-L6-v2)")
def retrieve_command(catalog, request, method, k, index, model):
    """The top-k tools for a request."""
    from lmlab.tools.catalog import load_catalog
    from lmlab.tools.retrieve import BM25Retriever, DenseConfig, DenseRetriever, load_minilm

    cat = load_catalog(catalog, verify=False)
    if method == "bm25":
        r = BM25Retriever(cat)
    elif index and Path(index, "manifest.json").is_file():  # --model is checked against the index's own model
        r = DenseRetriever.load(index, cat, encoder=load_minilm(model) if model else None)
    else:
        if index:  # refuse a folder that is not an index now, not after minutes of encoding
            from lmlab.io import existing_artefact

            existing_artefact(index, "tool-dense-index", what="dense tool index")
        r = DenseRetriever(cat, DenseConfig(model=model), progress=True)
        if index:
            r.save(index)
    res = r.search([request], k)
    for score, i in zip(res.D[0], res.I[0], strict=True):
        if i >= 0:
            t = cat.tools[i]
            click.echo(f"{score:8.3f}  {t.name}" + (f" - {t.summary}" if t.summary else ""))


@tools_group.command("validate")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.argument("command")
def validate_command(catalog, command):
    """Check a command against its documentation; exit 1 with the problems when it is not valid."""
    from lmlab.tools.catalog import load_catalog
    from lmlab.tools.cloud_cli import validate

    v = validate(command, load_catalog(catalog, verify=False))
    if v.ok:
        click.echo(f"ok ({v.tool})")
        return
    for e in v.errors:
        click.echo(e)
    raise SystemExit(1)


@tools_group.group("bench")
def bench_group():
    """Benchmarks built from documentation."""


@bench_group.command("cloud-cli")
@click.option("--catalog", type=click.Path(file_okay=False), default=None,
              help="gcloud catalogue (default: ingest the installed man pages; nothing is kept on disk)")
@click.option("--mode", default="docs", show_default=True, callback=_check_mode, help=MODE_HELP)
@click.option("--model", default="smollm2-135m", show_default=True,
              help="model spec (lmlab.lm.models) or http://host:port/v1#model")
@click.option("--limit", default=20, show_default=True, callback=at_least(1), help="test requests to evaluate")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--n-docs", default=3, show_default=True, callback=at_least(1),
              help="candidate commands documented in the prompt")
@click.option("--n-demos", default=3, show_default=True, callback=at_least(0),
              help="demonstrations in demos/both mode")
@click.option("--budget", default=768, show_default=True, help="prompt token budget")
@click.option("--retriever", type=click.Choice(["bm25", "dense"]), default="bm25", show_default=True)
@click.option("--max-tokens", default=64, show_default=True, callback=at_least(1))
@click.option("--seed", default=0, show_default=True, help="seed of the request sample")
@click.option("--threads", default=1, show_default=True, callback=thread_count,
              help=f"torch threads (0: torch's default; at most {MAX_THREADS})")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write scores and records as JSON")
def bench_cloud_cli(catalog, mode, model, limit, split, n_docs, n_demos, budget, retriever, max_tokens, seed,
                    threads, out):
    """Prompt a model with the request alone, demonstrations, documentation or both; score its gcloud
    commands (a fixed-seed sample of --limit requests, as recipes/tool_docs.py draws it)."""
    import random
    import tempfile

    if threads:
        import torch

        torch.set_num_threads(threads)

    from lmlab.io import write_json_atomic
    from lmlab.lm.backends import get_backend
    from lmlab.tools.catalog import load_catalog, save_catalog
    from lmlab.tools.cloud_cli import build_benchmark
    from lmlab.tools.prompting import SHOTS, DemoPool, PromptConfig, evaluate_prompting
    from lmlab.tools.retrieve import get_retriever

    if catalog is None:  # ingested into a folder that is removed once read (the catalogue stays in memory)
        from lmlab.tools.manpages import ingest_manpages

        with tempfile.TemporaryDirectory(prefix="lmlab-gcloud-") as tmp:
            cat = save_catalog(ingest_manpages([DEFAULT_MAN]), Path(tmp) / "catalog",
                               info={"source": "manpages", "inputs": [DEFAULT_MAN]})
    else:
        cat = load_catalog(catalog, verify=False)
    bench = build_benchmark(cat)
    pool = bench.split(split)
    examples = random.Random(seed).sample(pool, min(limit, len(pool)))
    config = PromptConfig(mode=mode, n_docs=n_docs, n_demos=n_demos, budget=budget)
    backend = get_backend(model)
    result = evaluate_prompting(backend, examples, cat, config=config,
                                retriever=get_retriever(retriever, cat) if mode in ("docs", "both") else None,
                                demo_pool=DemoPool(bench.split("train")) if mode in ("demos", "both") else None,
                                count_tokens=None, max_tokens=max_tokens, progress=True)
    s = result.scores
    click.echo(f"{mode}: n={s.n} path_acc={s.path_accuracy:.3f} flag_f1={s.flag_f1:.3f} "
               f"exact={s.exact_match:.3f} valid={s.valid_rate:.3f}"
               + (f" retrieval_recall@{n_docs}={result.retrieval_recall:.3f}" if result.retrieval_recall is not None
                  else ""))
    if out:
        write_json_atomic(out, {"config": config.__dict__, "shot": SHOTS[mode], "model": model, "split": split,
                                "retriever": retriever if mode in ("docs", "both") else None,
                                "seconds": result.seconds, "scores": s.to_json(),
                                "retrieval_recall": result.retrieval_recall, "records": result.records})


@tools_group.command("prompt")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
@click.argument("request", callback=_check_request)
@click.option("--mode", default="docs", show_default=True, callback=_check_mode, help=MODE_HELP)
@click.option("--n-docs", default=3, show_default=True, callback=at_least(1))
@click.option("--n-demos", default=3, show_default=True, callback=at_least(0),
              help="demonstrations from the benchmark's train split")
@click.option("--budget", default=768, show_default=True, help="prompt token budget")
@click.option("--model", default=None, help="answer with this model (spec or http://host:port/v1#model); "
                                            "without it, print the prompt only")
@click.option("--max-tokens", default=64, show_default=True, callback=at_least(1))
def prompt_command(catalog, request, mode, n_docs, n_demos, budget, model, max_tokens):
    """Build the tool-documentation prompt for a request (BM25 candidates); with --model, answer and validate."""
    from lmlab.tools.catalog import load_catalog
    from lmlab.tools.cloud_cli import build_benchmark, extract_command, validate
    from lmlab.tools.prompting import (
        DemoPool,
        PromptConfig,
        approx_token_counter,
        ask,
        build_prompt,
        chat_token_counter,
        completion_prompt,
        completion_token_counter,
        prompt_format,
    )
    from lmlab.tools.retrieve import BM25Retriever

    cat = load_catalog(catalog, verify=False)
    config = PromptConfig(mode=mode, n_docs=n_docs, n_demos=n_demos, budget=budget)
    backend = None
    count = approx_token_counter
    fmt = "chat"
    if model:
        from lmlab.lm.backends import get_backend

        backend = get_backend(model)
        fmt = prompt_format(backend, config)
        if getattr(backend, "tokenizer", None) is not None:
            count = (completion_token_counter if fmt == "completion" else chat_token_counter)(backend.tokenizer)
    cands = []
    if mode in ("docs", "both"):
        res = BM25Retriever(cat).search([request], n_docs)
        cands = [cat.tools[i] for i in res.I[0] if i >= 0]
    demos = DemoPool(build_benchmark(cat).split("train")).select(request, n_demos) if mode in ("demos", "both") \
        else []
    prompt = build_prompt(request, config=config, count_tokens=count, demos=demos, candidates=cands)
    if backend is None:
        for m in prompt.messages:
            click.echo(f"--- {m['role']}\n{m['content']}")
        click.echo(f"--- {prompt.n_tokens} tokens (approximate without --model)")
        return
    if fmt == "completion":
        click.echo(f"--- completion prompt (base model), {prompt.n_tokens} tokens")
        click.echo(completion_prompt(prompt.messages))
    reply = ask(backend, prompt.messages, fmt, max_tokens=max_tokens)
    command = extract_command(reply)
    click.echo(f"reply: {reply.strip()}")
    if command is None:
        click.echo("no gcloud command in the reply")
        return
    v = validate(command, cat)
    click.echo(f"command: {command}")
    click.echo("valid" if v.ok else "invalid: " + "; ".join(v.errors))
