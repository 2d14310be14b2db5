"""SILO at small scale: a permissively trained LM + a restricted-licence datastore vs an LM trained on everything.

Claim tested (Min, Gururangan et al. 2023, arXiv 2308.04430, abstract and Sec. 5): an LM trained only on
permissively licensed text (public domain + permissive software) degrades on out-of-domain text, and adding
a nonparametric datastore of the restricted text at inference, with kNN-LM, closes most of the gap to an LM
trained on everything ("closing 90% of the performance gap with an LM trained on the Pile"); RIC-LM helps less;
kNN-LM improves as the datastore grows (Fig. 3).

What this script does (every size is a flag; seeds 0, 1, 2 by default): the experiment of
``lmlab.silo.experiment`` (the same code ``make demo`` runs: licensed corpus -> split by package -> tokenizer and
parametric LM on permissive text only, reference LM of the same size and token budget on everything -> datastore
of the restricted training text -> kNN-LM tuned on restricted validation text (silo-lm grid, k to 4096) ->
parametric / RIC-LM / kNN-LM / reference perplexity on restricted and permissive test text from packages no model
saw), then

- once per seed (a seed draws the package split, the text pools and the LMs' initialisation and data order; the
  corpus is built once and shared): gap closed = (ppl_param - ppl_kNN) / (ppl_param - ppl_ref) on restricted test.
  The headline compares perplexities within each seed, as reductions relative to the parametric LM, averages
  them over seeds (mean ± std) and takes the gap closed as mean kNN-LM reduction / mean reference reduction
  (:func:`aggregate`), with every seed's own fraction beside it: with LMs this small the reference LM is often
  barely better than the parametric one, and then that seed's fraction means nothing;
- for the first seed: perplexity vs datastore size: copies of the datastore with the documents beyond the first
  fraction opted out, re-tuned at each size (results/silo.png); SmolLM2-135M as the parametric model over a
  (smaller) datastore of the same restricted documents.

    nice -n 10 python recipes/silo.py                        # defaults, 3 seeds (~30 min: results/silo.json "seconds")
    nice -n 10 python recipes/silo.py --seeds 0              # one seed (~13 min with SmolLM2, ~8 min without)
    python recipes/silo.py --steps 2000 --restricted-mb 8    # bigger
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from lmlab.io import invocation, write_json_atomic

PAPER = {"gap_closed_knn": "up to 90% (abstract; Fig. 2 / Table 3: kNN-LM closes most of the PD/SW-to-Pythia gap "
                           "out of domain)", "ric_vs_knn": "RIC-LM helps but less than kNN-LM (Sec. 5.1)",
         "size": "kNN-LM perplexity keeps falling as the datastore grows (Fig. 3)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


METHODS = ("knn_lm", "ric_lm", "reference")


def aggregate(per_seed: dict) -> dict:
    """What the seeds say together. ``per_seed``: seed -> {"perplexity": {domain: {method: ppl}}}.

    Each seed draws its own test packages, and their difficulty differs a lot (parametric perplexity 344-559 on
    restricted test here), so perplexities are compared within a seed, as the relative reduction from the
    parametric LM: ``drop = 1 - ppl_method / ppl_parametric``. Returns, per domain and method, the mean and std of
    those drops over seeds (``drop``, ``drop_std``), the gap closed as mean kNN-LM (or RIC-LM) drop over mean
    reference drop (``gap_closed``: for one seed exactly (ppl_param - ppl_kNN) / (ppl_param - ppl_ref); NaN when
    the reference is not better), and the mean perplexities (``perplexity``). Not a mean of the seeds' fractions:
    a seed whose reference is barely better than its parametric LM has a near-zero denominator, and its fraction
    (thousands of percent) would swamp it."""
    from lmlab.silo.experiment import vs_parametric

    tables = [r["perplexity"] for r in per_seed.values()]
    doms = list(tables[0])
    drops = {dom: {m: [-vs_parametric(t[dom], m) for t in tables] for m in METHODS} for dom in doms}
    drop = {dom: {m: statistics.fmean(v) for m, v in drops[dom].items()} for dom in doms}
    drop_std = {dom: {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in drops[dom].items()} for dom in doms}
    gaps = {dom: {m: drop[dom][m] / drop[dom]["reference"] if drop[dom]["reference"] > 0 else float("nan")
                  for m in ("knn_lm", "ric_lm")} for dom in doms}
    mean = {dom: {m: statistics.fmean(t[dom][m] for t in tables) for m in tables[0][dom]} for dom in doms}
    return {"perplexity": mean, "drop": drop, "drop_std": drop_std, "gap_closed": gaps}


def fraction_datastore(ds_dir: Path, sub: Path, drop_doc_ids: list[str]) -> None:
    """``sub``: a copy of the datastore in ``ds_dir`` with ``drop_doc_ids`` opted out, made under a temporary name
    and renamed into place when complete, so that an interrupted copy or opt-out never leaves a ``sub`` that a
    resumed run would take for finished (it used to: the whole datastore, reported as the smaller one)."""
    from lmlab.silo import Datastore

    tmp = sub.with_name(sub.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ds_dir, tmp)
    Datastore.load(tmp).optout(doc_ids=drop_doc_ids)
    shutil.rmtree(sub, ignore_errors=True)
    os.replace(tmp, sub)


def parse_list(flag: str, text: str, kind, ok, what: str) -> list:
    """``text`` (comma-separated) as a list of ``kind`` each passing ``ok``; ValueError with a one-line message."""
    try:
        out = [kind(x) for x in text.split(",")]
    except ValueError:
        out = None
    if not out or not all(ok(x) for x in out) or len(set(out)) != len(out):
        raise ValueError(f"{flag} takes comma-separated {what}{', each once' if out else ''}, got {text!r}")
    return out


def _pct(g: float) -> str:
    return "undefined" if math.isnan(g) else f"{g:.0%}"


def make_summary(agg: dict, smol: dict | None, command: str, *, per_seed: dict) -> dict:
    """The results table row (claim, paper, ours, command, reproduced) from :func:`aggregate`'s numbers and every
    seed's run."""
    g = agg["gap_closed"]["restricted"]["knn_lm"]
    drop, sd = agg["drop"]["restricted"], agg["drop_std"]["restricted"]
    n = len(per_seed)

    def less(m: str) -> str:  # "29±11%": how much lower than the parametric LM's perplexity
        return f"{drop[m]:.0%}" if n == 1 else f"{drop[m] * 100:.0f}±{sd[m] * 100:.0f}%"

    rows = {k: v["perplexity"]["restricted"] for k, v in per_seed.items()}
    each = "; ".join(f"{'seed ' + k + ': ' if n > 1 else ''}parametric {row['parametric']:.1f}, kNN-LM "
                     f"{row['knn_lm']:.1f}, reference {row['reference']:.1f}, RIC-LM {row['ric_lm']:.1f}"
                     for k, row in rows.items())
    seeds = f"{n} seeds" if n > 1 else "1 seed"
    ours = (("gap undefined" if math.isnan(g) else f"{g:.0%} of the gap closed") + f" ({seeds}): restricted test "
            f"perplexity {less('knn_lm')} lower with kNN-LM, {less('reference')} for the reference LM trained on "
            f"everything, {less('ric_lm')} with RIC-LM (restricted test ppl {each})")
    # the goal: at least half the gap. Over 100% (kNN-LM better than the reference) still meets it, but
    # says as much about the small reference LM as about the datastore: the absolute perplexities go beside it.
    reproduced = "yes" if g >= 0.5 else ("partly" if g > 0 else "no")
    ric = agg["gap_closed"]["restricted"]["ric_lm"]
    reason = (f"kNN-LM closes {_pct(g)} of the parametric-to-reference gap on held-out restricted sources "
              f"(mean relative perplexity reductions over {seeds}); RIC-LM {_pct(ric)}.")
    if n > 1:
        fractions = ", ".join(_pct(v["gap_closed"]["restricted"]["knn_lm"]) for v in per_seed.values())
        reason += (f" The seeds' own fractions ({fractions}) swing with how much better each seed's reference LM "
                   "is than its parametric LM, which is little at this scale.")
        if all(row["knn_lm"] < min(row["parametric"], row["reference"]) for row in rows.values()):
            reason += " kNN-LM beats both LMs in every seed."
    if g > 1:
        reason += (" Over 100%: kNN-LM beats the reference LM itself; both LMs are small and briefly trained, so read "
                   "the perplexities, not the fraction.")
    if ric < 0.1:
        reason += (" RIC-LM does not help here (the paper's does, less than kNN-LM): likely because a few-million-"
                   "parameter LM trained for minutes makes little use of a retrieved block in its context.")
    if math.isnan(g):
        reproduced = "no"
        reason = (f"the reference LM is not better than the parametric one on restricted test ({less('reference')} "
                  f"lower perplexity), so the gap is undefined; kNN-LM: {less('knn_lm')} lower.")
    if smol is not None:
        reason += (f" SmolLM2-135M over a {smol['datastore_entries']:,}-entry datastore of the same restricted "
                   f"documents (first seed): {smol['test_ppl_lm']:.1f} -> {smol['test_ppl_knn']:.1f}.")
    return {
        "claim": "A datastore of restricted text closes most of the gap between a permissive-only LM and one "
                 "trained on everything (kNN-LM > RIC-LM)",
        "paper": "up to 90% of the gap closed (kNN-LM, out of domain)",
        "ours": ours,
        "command": command,
        "reproduced": f"{reproduced}: {reason}",
    }


def main(argv=None) -> int:
    from lmlab.silo.experiment import ExperimentConfig

    d = ExperimentConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="/tmp/lmlab-silo", help="working folder (corpus, models, datastores; resumable)")
    p.add_argument("--corpus", default=None, help="an existing lmlab corpus folder (default: build one)")
    p.add_argument("--from", dest="from_specs", action="append", default=None,
                   help="corpus build specs when --corpus is not given (default: debian)")
    p.add_argument("--max-mb-per-source", type=float, default=d.max_mb_per_source, help="corpus cap per package")
    p.add_argument("--permissive-mb", type=float, default=d.permissive_mb, help="permissive training text")
    p.add_argument("--restricted-mb", type=float, default=d.restricted_mb,
                   help="restricted text (reference LM + datastore)")
    p.add_argument("--attribution", action="store_true", help="count CC-BY-style 'attribution' as permissive")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--preset", default=d.preset, help="tiny:<preset> architecture of both LMs")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--sequential", action="store_true", help="train the two LMs one after the other")
    p.add_argument("--window", type=int, default=d.window, help="evaluation / datastore window (stride = window / 2)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation and test tokens per domain")
    p.add_argument("--factory", default=d.factory,
                   help="faiss index of the datastore (IVF,Flat: exact distances of the probed lists, nprobe 8)")
    p.add_argument("--train-size", type=int, default=d.train_size, help="vectors to train the IVF quantizer")
    p.add_argument("--k-grid", default=",".join(map(str, d.k_grid)))
    p.add_argument("--sizes", default="0.1,0.25,0.5,1.0", help="datastore fractions for the size curve")
    p.add_argument("--ric-block-tokens", type=int, default=d.ric_block_tokens, help="RIC-LM block (tokens)")
    p.add_argument("--smollm2-datastore-tokens", type=int, default=60000)
    p.add_argument("--smollm2-eval-tokens", type=int, default=4000)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resummarize", action="store_true",
                   help="only recompute the summary of an existing --out from its recorded numbers")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one whole experiment each")
    p.add_argument("--out", default="results/silo.json")
    p.add_argument("--plot", default="results/silo.png")
    args = p.parse_args(argv)
    args.from_specs = args.from_specs or ["debian"]
    if args.resummarize:
        import json

        try:
            old = json.loads(Path(args.out).read_text())
            command, per_seed = old["summary"]["command"], old["per_seed"]
            agg = aggregate(per_seed)
        except (OSError, ValueError, LookupError, TypeError) as e:
            print(f"error: --resummarize needs this recipe's results at --out {args.out} ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 2
        old.update(agg)
        old["summary"] = make_summary(agg, old.get("smollm2"), command, per_seed=per_seed)
        write_json_atomic(args.out, old)
        print(old["summary"])
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # every flag is checked here, not where it is first used (--sizes: after every seed's whole experiment)
    if args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        seeds = parse_list("--seeds", args.seeds, int, lambda x: True, "integers")
        k_grid = parse_list("--k-grid", args.k_grid, int, lambda k: k >= 1, "integers >= 1")
        sizes = sorted(parse_list("--sizes", args.sizes, float, lambda f: 0 < f <= 1, "fractions in (0, 1]"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.time()

    from lmlab.errors import LmlabError
    from lmlab.lm import models
    from lmlab.silo import Datastore, DatastoreConfig, build_datastore
    from lmlab.silo.experiment import SiloExperiment, format_table, ids_of

    per_seed: dict[str, dict] = {}
    corpus = args.corpus
    first = None  # the first seed's (experiment, datastore, results): the size curve and SmolLM2 use it
    for seed in seeds:
        torch.manual_seed(seed)
        try:
            cfg = ExperimentConfig(  # checks every value: a bad flag is one line
                work=str(Path(args.work) / f"seed{seed}"), corpus=corpus, from_specs=tuple(args.from_specs),
                max_mb_per_source=args.max_mb_per_source, permissive_mb=args.permissive_mb,
                restricted_mb=args.restricted_mb, attribution=args.attribution, vocab_size=args.vocab_size,
                preset=args.preset, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                parallel=not args.sequential, window=args.window, eval_tokens=args.eval_tokens,
                factory=args.factory, train_size=args.train_size, k_grid=tuple(k_grid),
                ric_block_tokens=args.ric_block_tokens, seed=seed, device=args.device)
            log(f"seed {seed} ({len(per_seed) + 1} of {len(seeds)}) in {cfg.work}")
            exp = SiloExperiment(cfg, echo=log)
            exp.prepare()
            exp.train_lms()
            ds = exp.build_datastore()
            res = exp.evaluate()
        except LmlabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        corpus = corpus or str(exp.corpus_dir)  # built by the first seed, shared by the others
        print(format_table(exp.table, exp.gaps), flush=True)
        per_seed[str(seed)] = {"perplexity": exp.table, "gap_closed": exp.gaps, "tuned": res["tuned"],
                               "test_tokens": res["test_tokens"], "pools_mb": exp.pool_mb,
                               "knn_tune_and_test_seconds": res["knn_tune_and_test_seconds"]}
        if first is None:
            first = (exp, ds, res)
    exp, ds, res = first
    agg = aggregate(per_seed)
    if len(seeds) > 1:
        log(f"over seeds {args.seeds}: restricted test perplexity lower than the parametric LM's by "
            + ", ".join(f"{m} {agg['drop']['restricted'][m]:.0%}" for m in METHODS)
            + f" (means); gap closed by kNN-LM {_pct(agg['gap_closed']['restricted']['knn_lm'])}")
    work, param, restr_train = exp.work, exp.param, exp.pools["restricted_train"]
    ds_dir = work / "datastore"

    # perplexity vs datastore size: copies of the datastore with the documents beyond the first fraction opted out
    size_curve = []
    doc_tokens = torch.bincount(torch.from_numpy(ds.doc.astype("int64")), minlength=len(ds.docs)).cumsum(0)
    for frac in sizes:
        keep = int(torch.searchsorted(doc_tokens, frac * ds.n_entries)) + 1  # documents holding frac of tokens
        if frac >= 1.0 or keep >= len(ds.docs):
            store = ds
        else:
            sub = work / f"datastore-{frac:g}"
            if not (sub / "manifest.json").is_file():
                fraction_datastore(ds_dir, sub, [d.id for d in ds.docs[keep:]])
            store = Datastore.load(sub, param)
        str_, _, sres = exp.tune_and_test(store)
        size_curve.append({"fraction": frac, "live_entries": len(store), "best": vars(str_.best),
                           "restricted_ppl": sres["restricted"].ppl, "permissive_ppl": sres["permissive"].ppl})
        log(f"size {frac:g}: {len(store):,} entries -> restricted test ppl {sres['restricted'].ppl:.2f}")

    def finish(smol):
        if args.plot:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(5.5, 3.8))
                xs = [r["live_entries"] for r in size_curve]
                ax.plot(xs, [r["restricted_ppl"] for r in size_curve], "o-", label="kNN-LM (restricted test)")
                first_table = exp.table  # the curve is the first seed's: so are its reference lines
                ax.axhline(first_table["restricted"]["parametric"], ls="--", c="gray",
                           label="parametric (permissive-only)")
                ax.axhline(first_table["restricted"]["reference"], ls=":", c="k", label="reference (all data)")
                ax.set_xscale("log")
                ax.set_xlabel("datastore entries (tokens)")
                ax.set_ylabel("perplexity")
                ax.set_title(f"SILO at small scale: perplexity vs datastore size (seed {seeds[0]})")
                ax.legend(fontsize=8)
                fig.tight_layout()
                Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(args.plot, dpi=120)
            except ImportError:
                log("matplotlib is not installed: no plot")
                args.plot = None

        summary = make_summary(agg, smol, invocation(argv), per_seed=per_seed)
        result = {
            "summary": summary, "paper": PAPER,
            "config": vars(args), "pools_mb": exp.pool_mb,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "machine": platform.machine(), "threads": args.threads, "device": args.device,
                            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
            "first_seed": seeds[0],  # datastore, tuned, test_tokens, size_curve and smollm2 are that seed's
            "datastore": ds.stats(), "tuned": res["tuned"], "test_tokens": res["test_tokens"],
            "seeds": seeds, **agg, "size_curve": size_curve, "smollm2": smol, "per_seed": per_seed,
            "seconds": time.time() - t0, "knn_tune_and_test_seconds": res["knn_tune_and_test_seconds"],
        }
        write_json_atomic(args.out, result)
        log(f"wrote {args.out}: {summary['ours']}")

    finish(None)  # written before the (slow) SmolLM2 run, rewritten after it
    smol = None
    if not args.skip_smollm2 and models.is_available("smollm2-135m"):
        log("SmolLM2-135M: datastore over the same restricted documents (capped), tune, test")
        sm = models.load("smollm2-135m", device=args.device)
        sdir = work / "datastore-smollm2"
        stok = sm.tokenizer
        docs, n = [], 0
        for d in restr_train:
            docs.append(d)
            n += len(stok(d.text, add_special_tokens=False)["input_ids"])
            if n >= args.smollm2_datastore_tokens:
                break
        sw = 512
        t = time.time()
        sds = Datastore.load(sdir, sm) if (sdir / "manifest.json").is_file() else build_datastore(
            docs, sm, sdir, DatastoreConfig(window=sw, stride=sw // 2, batch_size=4, docs_per_chunk=8))
        build_s = time.time() - t
        sval = ids_of(stok, exp.pools["restricted_validation"], args.smollm2_eval_tokens)
        stest = ids_of(stok, exp.pools["restricted_test"], args.smollm2_eval_tokens)
        st, _, sr = exp.tune_and_test(sds, sm, sval, {"restricted": stest})
        sres = sr["restricted"]
        smol = {"datastore_entries": sds.n_entries, "datastore_documents": len(docs), "build_seconds": build_s,
                "best": vars(st.best), "val_ppl_lm": st.ppl_lm, "val_ppl_knn": st.best_ppl,
                "test_tokens": sres.n_tokens, "test_ppl_lm": sres.ppl_lm, "test_ppl_knn": sres.ppl}
        log(f"SmolLM2: restricted test ppl {sres.ppl_lm:.2f} -> kNN-LM {sres.ppl:.2f} ({sds.n_entries:,} entries)")

    if smol is not None:
        finish(smol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
