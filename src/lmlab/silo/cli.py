"""`lmlab silo ...`: build a datastore, evaluate kNN-LM / RIC-LM, generate with attribution, opt out, serve.

Heavy imports (torch, faiss, transformers) happen inside the commands, so `lmlab --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmlab.cli import at_least
from lmlab.errors import ConfigError

RESTRICTED = ("copyleft", "noncommercial", "unknown")  # SILO's datastore pool: everything not permissive


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise ConfigError(f"--shard takes i/n with 0 <= i < n (e.g. 0/4), not {value!r}")
    return i, n


def _load_model(spec: str, tokenizer: str | None):
    """Load a model; ``tokenizer`` (a folder) is refused for anything but tiny:* (which has no tokenizer of its
    own), as a model folder or named model would ignore it."""
    from lmlab.lm import models

    tok = None
    if tokenizer:
        if not spec.startswith("tiny:"):
            raise ConfigError(f"--tokenizer is for tiny:* models only; {spec} comes with its own tokenizer: "
                              "drop --tokenizer")
        from lmlab.lm.tokenizer import load as load_tokenizer

        tok = load_tokenizer(tokenizer)
    return models.load(spec, tokenizer=tok)


def _selected_classes(classes: tuple[str, ...], restricted: bool) -> tuple[str, ...]:
    if classes and restricted:
        raise ConfigError(f"give --license-class or --restricted (= {', '.join(RESTRICTED)}), not both")
    return tuple(classes) or (RESTRICTED if restricted else ())


def open_documents(path: str, license_classes: tuple[str, ...] = (), *, max_docs: int | None = None):
    """Documents of a corpus folder (lmlab.corpus) or a plain folder/JSONL; optionally only some licence classes."""
    import itertools

    from lmlab.corpus import open_corpus

    corpus = open_corpus(path)
    if license_classes:
        corpus = corpus.filter(license_classes=list(license_classes))
    docs = iter(corpus)
    return itertools.islice(docs, max_docs) if max_docs is not None else docs


def _texts(path: str, max_docs: int | None = None) -> list[str]:
    return [d.text for d in open_documents(path, max_docs=max_docs)]


@click.group("silo")
def silo_group():
    """SILO (arXiv 2308.04430): a datastore of restricted text beside a permissively trained LM."""


def _options(*options):
    """One decorator applying click ``options`` in the order given (a group of options several commands share)."""
    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def _encoding_options(*, merge: bool = False):
    """The settings a datastore's keys are encoded with; merge-shards takes them only to check the shards'."""
    def option(name, default, help_):
        if merge:
            return click.option(name, default=None, type=type(default), help=f"{help_} Checked: must be the shards'.")
        return click.option(name, default=default, show_default=True, help=help_)

    return _options(
        option("--key-point", "final",
               "'final' (hidden_states[-1]) or MODULE:input|output, e.g. model.layers.3.mlp:input."),
        option("--window", 1024, "Tokens per window (<= model positions)."),
        option("--stride", 512, "Tokens between window starts."),
        option("--docs-per-chunk", 64, "Unit of resume and sharding."))


_index_options = _options(
    click.option("--factory", default="Flat", show_default=True,
                 help="faiss index_factory string, e.g. IVF4096,PQ64 for large stores; 'auto' picks by size."),
    click.option("--nprobe", default=8, show_default=True, help="IVF lists probed per search (>= 1)."))


@silo_group.command("build-datastore")
@click.option("--corpus", "corpus_path", required=True, type=click.Path(exists=True),
              help="A corpus folder (lmlab corpus build/split) or a plain folder/JSONL of text.")
@click.option("--model", "model_spec", required=True, help="Model spec (HF folder, named model, tiny:<preset>).")
@click.option("--tokenizer", default=None, type=click.Path(), help="Tokenizer folder for tiny:* models.")
@click.option("--out", required=True, type=click.Path(), help="Datastore folder (or shard folder with --shard).")
@click.option("--license-class", "classes", multiple=True,
              help="Only documents of these classes (repeatable). Default: all documents.")
@click.option("--restricted", is_flag=True, help=f"Only the restricted classes ({', '.join(RESTRICTED)}).")
@click.option("--shard", default=None, help="Encode shard i/n only; join shards with `lmlab silo merge-shards`.")
@click.option("--max-docs", default=None, type=int, callback=at_least(1), help="Only the first N documents.")
@_encoding_options()
@click.option("--batch-size", default=8, show_default=True)
@_index_options
def build_cmd(corpus_path, model_spec, tokenizer, out, classes, restricted, shard, max_docs, **kw):
    """Encode a corpus into a datastore (keys, next tokens, provenance) and index it; resumable."""
    from lmlab.silo import DatastoreConfig, build_datastore
    from lmlab.silo.datastore import KIND, existing_artefact

    config, shard = DatastoreConfig(**kw), _shard(shard)  # every option is checked before the model loads
    if shard is None:
        existing_artefact(out, KIND)
    docs = open_documents(corpus_path, _selected_classes(classes, restricted), max_docs=max_docs)
    loaded = _load_model(model_spec, tokenizer)
    res = build_datastore(docs, loaded, out, config, shard=shard)
    if isinstance(res, dict):
        click.echo(f"shard {res['shard'][0]}/{res['shard'][1]}: {res['entries_this_shard']} entries -> {out}")
    else:
        s = res.stats()
        kept = (f" ({s['documents'] - s['live_documents']} documents stay opted out, as in the datastore it "
                f"replaced)" if s["live_documents"] < s["documents"] else "")
        click.echo(f"datastore {out}: {s['entries']} entries, {s['documents']} documents, "
                   f"{s['index_bytes_per_entry']:.1f} index bytes/entry{kept}")


@silo_group.command("merge-shards")
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path())
@_encoding_options(merge=True)
@_index_options
def merge_cmd(shards, out, factory, nprobe, **encoding):
    """Join the shard folders of `build-datastore --shard i/n` into one datastore."""
    from lmlab.errors import ManifestMismatchError
    from lmlab.silo import DatastoreConfig, merge_shards
    from lmlab.silo.datastore import shard_settings

    config = DatastoreConfig(factory=factory, nprobe=nprobe)
    built = shard_settings(shards)
    wrong = [f"--{k.replace('_', '-')} {v} (the shards': {built.get(k)})" for k, v in encoding.items()
             if v is not None and v != built.get(k)]
    if wrong:  # the keys are encoded already: a merge cannot change how
        raise ManifestMismatchError(f"the shards were encoded with other settings than {', '.join(wrong)}: drop "
                                    "those options, or rebuild the shards with them")
    ds = merge_shards(list(shards), out, config)
    click.echo(f"datastore {out}: {ds.n_entries} entries from {len(shards)} shards")


_knn_options = _options(
    click.option("--k", default=1024, show_default=True),
    click.option("--temperature", default=1.0, show_default=True),
    click.option("--lmbda", default=0.25, show_default=True, help="Weight of p_kNN in the interpolation."),
    click.option("--rescore", is_flag=True, help="Exact distances from fp16 keys (approximate indexes)."))


@silo_group.command("eval")
@click.option("--datastore", required=True, type=click.Path(exists=True))
@click.option("--model", "model_spec", required=True)
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--validation", required=True, type=click.Path(exists=True), help="Text/corpus to tune k, T, lambda on.")
@click.option("--test", "test_path", required=True, type=click.Path(exists=True), help="Text/corpus to report on.")
@click.option("--ric", default=None, type=click.Path(exists=True), help="A RIC-LM index (`lmlab silo build-ric`).")
@click.option("--ric-window", default=None, type=int, callback=at_least(1),
              help="RIC-LM window (default: positions - blocks).")
@click.option("--max-docs", default=None, type=int, callback=at_least(1))
@click.option("--rescore", is_flag=True)
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the numbers here.")
def eval_cmd(datastore, model_spec, tokenizer, validation, test_path, ric, ric_window, max_docs, rescore, json_out):
    """Tune kNN-LM on validation (silo-lm grid), report parametric / kNN-LM (/ RIC-LM) perplexity on test."""
    from lmlab.io import output_file
    from lmlab.silo import Datastore, KnnLM, KnnLMConfig

    if ric_window is not None and not ric:
        raise ConfigError("--ric-window is the window of RIC-LM: give --ric too, or drop it")
    if json_out:
        output_file(json_out, "--json")
    val_texts, test_texts = _texts(validation, max_docs), _texts(test_path, max_docs)
    loaded = _load_model(model_spec, tokenizer)
    ds = Datastore.load(datastore, loaded)
    knn = KnnLM(loaded, ds, KnnLMConfig(rescore=rescore))
    if ric:  # opened and checked before the evaluation, not after it
        r, ric_cfg = _ric_for(ric, loaded, ric_window)
    tr = knn.tune(knn.encode(val_texts), progress=True)
    res = knn.with_config(k=tr.best.k, temperature=tr.best.temperature, lmbda=tr.best.lmbda).evaluate(
        knn.encode(test_texts), progress=True)
    out = {"validation": {"ppl_lm": tr.ppl_lm, "ppl_knn": tr.best_ppl, "best": vars(tr.best)},
           "test": {"tokens": res.n_tokens, "ppl_lm": res.ppl_lm, "ppl_knn": res.ppl}}
    if ric:
        out["test"]["ppl_ric"] = r.evaluate(loaded.model, loaded.tokenizer, knn.encode(test_texts), ric_cfg,
                                            progress=True).ppl
    click.echo(f"tuned on validation: k={tr.best.k} temperature={tr.best.temperature} lmbda={tr.best.lmbda}")
    for name, key in (("parametric", "ppl_lm"), ("+ kNN-LM", "ppl_knn"), ("+ RIC-LM", "ppl_ric")):
        if key in out["test"]:
            click.echo(f"{name:12s} test perplexity {out['test'][key]:10.3f}")
    if json_out:
        from lmlab.io import write_json_atomic

        write_json_atomic(json_out, out)


def _ric_for(folder: str, loaded, window: int | None):
    """The RIC-LM index at ``folder`` (built with ``loaded``'s tokenizer) and its evaluation config: one block
    before a window of ``window`` tokens (default: the positions the block leaves), checked against the model."""
    from lmlab.silo.ric_lm import RicLM, RicLMConfig

    r = RicLM.load(folder, loaded.tokenizer)
    bt = int(r.manifest["block_tokens"])
    positions = int(loaded.model.config.max_position_embeddings)
    if window is None and positions - bt < 1:
        raise ConfigError(f"{folder} holds blocks of {bt} tokens, which leave no room for a window in the model's "
                          f"{positions} positions: rebuild it with a smaller --block-tokens")
    window = window if window is not None else positions - bt
    cfg = RicLMConfig(block_tokens=bt, n_blocks=1, window=window, stride=max(1, window // 2))
    cfg.validate(positions)
    return r, cfg


@silo_group.command("build-ric")
@click.option("--corpus", "corpus_path", required=True, type=click.Path(exists=True))
@click.option("--model", "model_spec", required=True, help="Model whose tokenizer cuts the blocks.")
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--out", required=True, type=click.Path())
@click.option("--block-tokens", default=256, show_default=True, callback=at_least(1))
@click.option("--license-class", "classes", multiple=True)
@click.option("--restricted", is_flag=True, help=f"Only the restricted classes ({', '.join(RESTRICTED)}).")
def build_ric_cmd(corpus_path, model_spec, tokenizer, out, block_tokens, classes, restricted):
    """Index fixed-size token blocks of a corpus with BM25 for RIC-LM."""
    from lmlab.silo.datastore import existing_artefact
    from lmlab.silo.ric_lm import KIND, RicLM

    existing_artefact(out, KIND)  # checked before the model loads
    docs = open_documents(corpus_path, _selected_classes(classes, restricted))
    loaded = _load_model(model_spec, tokenizer)
    r = RicLM.build(docs, loaded.tokenizer, out, block_tokens=block_tokens)
    click.echo(f"RIC-LM index {out}: {r.n_blocks} blocks of <= {block_tokens} tokens")


@silo_group.command("generate")
@click.option("--datastore", required=True, type=click.Path(exists=True))
@click.option("--model", "model_spec", required=True)
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--prompt", required=True)
@click.option("--max-tokens", default=32, show_default=True, callback=at_least(1))
@click.option("--sample-temperature", default=0.0, show_default=True, callback=at_least(0), help="0 is greedy.")
@click.option("--attribute", is_flag=True, help="Print each token's top neighbours (document, licence, snippet).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@_knn_options
def generate_cmd(datastore, model_spec, tokenizer, prompt, max_tokens, sample_temperature, attribute, as_json,
                 k, temperature, lmbda, rescore):
    """Generate from the kNN-LM; with --attribute, say which documents each token came from."""
    from dataclasses import asdict

    from lmlab.silo import Datastore, KnnLM, KnnLMConfig

    config = KnnLMConfig(k=k, temperature=temperature, lmbda=lmbda, rescore=rescore)
    loaded = _load_model(model_spec, tokenizer)
    knn = KnnLM(loaded, Datastore.load(datastore, loaded), config)
    g = knn.generate(prompt, max_tokens=max_tokens, temperature=sample_temperature)
    if as_json:
        click.echo(json.dumps(asdict(g), default=str, indent=1))
        return
    click.echo(prompt + g.text)
    if attribute:
        click.echo(format_attribution(g.tokens))


def format_attribution(tokens, *, max_tokens: int = 64) -> str:
    """One line per token: probability, the datastore's share, and its top neighbour's provenance."""
    import math

    lines = []
    for t in tokens[:max_tokens]:
        head = f"{t.token!r:>12} p={math.exp(t.logprob):.3f} datastore={t.datastore_share:.0%}"
        if t.neighbours:
            n = t.neighbours[0]
            snippet = n.snippet.replace("\n", " ")[-60:]
            head += f"  <- {n.doc_id[:12]} {n.license} {n.source[:50]} (+{n.offset}, {n.share:.0%}) ...{snippet!r}"
        lines.append(head)
    return "\n".join(lines)


@silo_group.command("optout")
@click.option("--datastore", required=True, type=click.Path(exists=True))
@click.option("--doc-id", "doc_ids", multiple=True, help="A document id (repeatable).")
@click.option("--source", "sources", multiple=True, help="A source or group (package); 'prefix*' for a prefix.")
@click.option("--license-class", "classes", multiple=True, help="A whole licence class.")
@click.option("--ric", default=None, type=click.Path(exists=True), help="Also tombstone them in this RIC-LM index.")
def optout_cmd(datastore, doc_ids, sources, classes, ric):
    """Remove documents from the datastore for good (index remove_ids + tombstones in the manifest)."""
    from lmlab.silo import Datastore
    from lmlab.silo.ric_lm import RicLM

    ds = Datastore.load(datastore)
    r = RicLM.load(ric) if ric else None  # every target is opened before either is changed
    rep = ds.optout(doc_ids=doc_ids, sources=sources, license_classes=classes)
    click.echo(f"removed {rep.documents} documents ({rep.entries} entries); {rep.live_entries} entries left")
    if r is not None:
        n = r.optout(doc_ids=doc_ids, sources=sources, license_classes=classes)
        click.echo(f"RIC-LM: {n} more blocks masked")


@silo_group.command("serve")
@click.option("--datastore", required=True, type=click.Path(exists=True))
@click.option("--model", "model_spec", required=True)
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=click.IntRange(0, 65535))
@click.option("--audit-log", default=None, type=click.Path(),
              help="Opt-out audit log (default: DATASTORE.audit.jsonl).")
@_knn_options
def serve_cmd(datastore, model_spec, tokenizer, host, port, audit_log, k, temperature, lmbda, rescore):
    """Serve generation with attribution, scoring, opt-out (admin token: $LMLAB_SILO_ADMIN_TOKEN) and stats."""
    import uvicorn

    from lmlab.lm.server import listening_socket
    from lmlab.silo import Datastore, KnnLMConfig
    from lmlab.silo.server import SiloService, audit_log_path, create_app

    config = KnnLMConfig(k=k, temperature=temperature, lmbda=lmbda, rescore=rescore)
    audit_log = audit_log_path(datastore, audit_log)
    with listening_socket(host, port) as sock:  # bound before the model loads: a taken port is one line, at once
        loaded = _load_model(model_spec, tokenizer)
        service = SiloService(loaded, Datastore.load(datastore, loaded), config, audit_log=audit_log)
        click.echo(f"serving SILO at http://{host}:{sock.getsockname()[1]}/v1 (docs at /docs)", err=True)
        uvicorn.Server(uvicorn.Config(create_app(service), log_level="info")).run(sockets=[sock])


@silo_group.command("pipeline")
@click.option("--corpus", "corpus_dir", required=True, type=click.Path(exists=True),
              help="A split corpus (train/, validation/, test/ from `lmlab corpus split`).")
@click.option("--model", "model_spec", required=True, help="The (permissively trained) parametric LM.")
@click.option("--tokenizer", default=None, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Working folder (datastore, ric, results.json).")
@click.option("--max-docs", default=None, type=int, callback=at_least(1),
              help="Cap documents per split (for quick runs).")
@click.option("--window", default=None, type=int, callback=at_least(2),
              help="Window (default: min(1024, model positions)).")
@click.option("--prompt", default=None, help="Prompt for the attributed sample (default: a test document's start).")
@click.option("--reference", "reference_spec", default=None,
              help="An LM trained on everything (same tokenizer): adds its perplexity and the gap closed.")
def pipeline_cmd(corpus_dir, model_spec, tokenizer, out, max_docs, window, prompt, reference_spec):
    """Datastore from the restricted train split, tune on validation, report on test, one attributed sample."""
    from lmlab.errors import DataError
    from lmlab.io import output_folder, write_json_atomic
    from lmlab.silo import DatastoreConfig, KnnLM, KnnLMConfig, build_datastore
    from lmlab.silo.ric_lm import RicLM, RicLMConfig

    corpus_dir, out = Path(corpus_dir), output_folder(out, "--out")
    for split in ("train", "validation", "test"):
        if not (corpus_dir / split).is_dir():
            raise DataError(f"{corpus_dir} has no {split}/: make one with `lmlab corpus split`")

    def restricted_texts(split):
        texts = [d.text for d in open_documents(str(corpus_dir / split), RESTRICTED, max_docs=max_docs)]
        if not texts:
            raise DataError(f"{corpus_dir / split} has no restricted documents to evaluate on")
        return texts

    val_texts, test_texts = restricted_texts("validation"), restricted_texts("test")
    loaded = _load_model(model_spec, tokenizer)
    if reference_spec:  # loaded and compared now, not after the datastore is built
        from lmlab.lm.data import tokenizer_fingerprint

        ref = _load_model(reference_spec, tokenizer if reference_spec.startswith("tiny:") else None)
        if tokenizer_fingerprint(ref.tokenizer) != tokenizer_fingerprint(loaded.tokenizer):
            raise DataError(f"--reference {reference_spec} has another tokenizer than --model: perplexities would "
                            f"not be comparable")
    positions = int(getattr(loaded.model.config, "max_position_embeddings", 1024))
    window = window if window is not None else min(1024, positions)
    ds = build_datastore(open_documents(str(corpus_dir / "train"), RESTRICTED, max_docs=max_docs), loaded,
                         out / "datastore", DatastoreConfig(window=window, stride=window // 2, factory="auto"))
    knn = KnnLM(loaded, ds, KnnLMConfig())
    tr = knn.tune(knn.encode(val_texts), progress=True)
    knn = knn.with_config(k=tr.best.k, temperature=tr.best.temperature, lmbda=tr.best.lmbda)
    res = knn.evaluate(knn.encode(test_texts), progress=True)
    bt = max(16, positions // 4)
    ric = RicLM.build(open_documents(str(corpus_dir / "train"), RESTRICTED, max_docs=max_docs), loaded.tokenizer,
                      out / "ric", block_tokens=bt)
    rw = min(window, positions - bt)
    ric_res = ric.evaluate(loaded.model, loaded.tokenizer, knn.encode(test_texts),
                           RicLMConfig(block_tokens=bt, n_blocks=1, window=rw, stride=max(1, rw // 2)))
    prompt = prompt or test_texts[0][:80]
    g = knn.generate(prompt, max_tokens=min(48, positions - len(loaded.tokenizer(prompt)["input_ids"]) - 1))
    results = {"best": vars(tr.best), "validation_ppl_knn": tr.best_ppl, "validation_ppl_lm": tr.ppl_lm,
               "test_tokens": res.n_tokens, "test_ppl_lm": res.ppl_lm, "test_ppl_knn": res.ppl,
               "test_ppl_ric": ric_res.ppl, "sample": {"prompt": prompt, "text": g.text}}
    if reference_spec:
        from lmlab.lm.score import perplexity
        from lmlab.silo.experiment import gap_closed

        ref_ppl = perplexity(ref.model, knn.encode(test_texts), window=window, stride=window // 2).ppl
        results.update(test_ppl_reference=ref_ppl, gap_closed_knn=gap_closed(res.ppl_lm, ref_ppl, res.ppl),
                       gap_closed_ric=gap_closed(res.ppl_lm, ref_ppl, ric_res.ppl))
    write_json_atomic(out / "results.json", results)
    click.echo(f"datastore: {ds.n_entries} entries from {len(ds.docs)} restricted documents")
    click.echo(f"tuned on validation: k={tr.best.k} temperature={tr.best.temperature} lmbda={tr.best.lmbda}")
    click.echo(f"test perplexity: parametric {res.ppl_lm:.3f} | + RIC-LM {ric_res.ppl:.3f} | + kNN-LM {res.ppl:.3f}"
               + (f" | reference {results['test_ppl_reference']:.3f} (kNN-LM closes "
                  f"{results['gap_closed_knn']:.0%} of the gap)" if reference_spec else ""))
    click.echo("sample: " + prompt + g.text)
    click.echo(format_attribution(g.tokens, max_tokens=12))


@silo_group.command("demo")
@click.option("--work", default="runs/silo-demo", show_default=True, type=click.Path(),
              help="Working folder: corpus, tokenizer, both LMs, datastore, results.json (an interrupted run resumes).")
@click.option("--corpus", default=None, type=click.Path(exists=True),
              help="An lmlab corpus folder (default: build one from this machine's Debian packages).")
@click.option("--max-mb-per-source", default=None, type=float, help="Corpus cap per package [0.25].")
@click.option("--steps", default=None, type=int, help="Training steps of each LM [300].")
@click.option("--preset", default=None, help="tiny:<preset> architecture of both LMs [small].")
@click.option("--permissive-mb", default=None, type=float, help="Permissive training text [4].")
@click.option("--restricted-mb", default=None, type=float, help="Restricted text: reference LM + datastore [1.5].")
@click.option("--eval-tokens", default=None, type=int, help="Validation and test tokens per domain [8000].")
@click.option("--sequential", is_flag=True, help="Train the two LMs one after the other (default: in parallel).")
def demo_cmd(work, corpus, max_mb_per_source, steps, preset, permissive_mb, restricted_mb, eval_tokens, sequential):
    """The flagship end to end: licensed corpus -> permissive LM + reference LM -> datastore -> table + attribution.

    About 11 minutes on 2 cores at the defaults, install included (`make demo` from a fresh clone).
    """
    from lmlab.io import output_folder, write_json_atomic
    from lmlab.silo.experiment import ExperimentConfig, SiloExperiment, format_table, with_overrides

    if corpus and max_mb_per_source is not None:
        raise ConfigError("--max-mb-per-source caps the corpus the demo builds; with --corpus there is none to "
                          "build: drop one of them")
    output_folder(work, "--work")
    cfg = with_overrides(ExperimentConfig(work=work), corpus=corpus, max_mb_per_source=max_mb_per_source,
                         steps=steps, preset=preset, permissive_mb=permissive_mb, restricted_mb=restricted_mb,
                         eval_tokens=eval_tokens, parallel=False if sequential else None)
    exp = SiloExperiment(cfg, echo=click.echo)
    res = exp.run()
    g = res.pop("generation")
    write_json_atomic(Path(work) / "results.json", res)
    click.echo("")
    click.echo(format_table(res["table"], res["gap_closed"]))
    click.echo(f"\nkNN-LM sample (temperature 0.7, from a held-out restricted document's first words):\n"
               f"  {g.prompt}{g.text}")
    click.echo("\nwhere each generated token came from (top neighbour: document, licence, package, offset, share):")
    click.echo(format_attribution(g.tokens, max_tokens=16))
    b = exp.tuned.best
    click.echo(f"\nall numbers: {Path(work) / 'results.json'}; serve it with `lmlab silo serve --datastore "
               f"{exp.ds.folder} --model {exp.work / 'lm-permissive' / 'run' / 'model'} --k {b.k} --temperature "
               f"{b.temperature} --lmbda {b.lmbda}`; opt a document out with `lmlab silo optout --datastore "
               f"{exp.ds.folder} --doc-id ID`")
