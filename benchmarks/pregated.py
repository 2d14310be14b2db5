"""Offloaded MoE decoding: resident vs on_demand vs prefetch_all vs pregated, on every tier, in one process.

The Pre-gated MoE paper's Figs. 10-12 analogue (arXiv 2308.12066): per-token decode latency, tokens/s, peak
resident expert memory, bytes moved, prefetch hit rate and stall time of :class:`lmlab.moe.offload.OffloadEngine`
under four policies (plus on_demand / pregated with an LRU cache), on the same model, prompts and routing.

Tiers: ``mmap`` (page cache), ``disk`` (page cache evicted before every expert read), ``link`` (emulated link)
and, on a GPU machine, ``cuda`` (pinned CPU -> GPU copies on a side stream). The link's speed is set from the
measured compute: ``--link-ratio r`` makes moving one block's active experts take r times as long as computing
one block (r = 1 by default: the balance at which the next block's experts can just be hidden behind the current
block, the regime the issue's targets assume; on the H100 run, 33.6 MB experts over PCIe gave r ~ 1, while big
offloaded models on PCIe have r >> 1), re-set every round from that round's resident run (its time in the L blocks
of a decode step, over L: the embedding and the LM head are outside any block's window). ``--sweep`` runs the
link tier at several r (the latency-vs-bandwidth curve).

Statistics: every round runs each variant once, back to back (the order rotated by round); a variant's latency
is the median per-token decode latency of its run; "x resident" and the headline ratios are medians over rounds of
the ratio within a round (the shared dev VM's speed moves by up to 2x for seconds at a time, which a ratio within
a round cancels and a ratio of medians does not; the latter is recorded too). On a CPU the asynchronous copies run
in the engine's copy process (``pregated``) or on a Python thread (``pregated/thread``, which shares the decoding
thread's GIL: the difference between the two rows is that cost); a C++/CUDA engine pays neither.

    python benchmarks/pregated.py                      # CPU: mmap, disk, link tiers + sweep -> results/pregated.json
    PYTHONPATH=src python3 benchmarks/pregated.py --preset gpu   # GPU: cuda tier (writes $OUT/pregated_cuda.json)
    python benchmarks/pregated.py --gpu-results pregated_cuda.json   # CPU run that records that GPU run too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lmlab.io import write_json_atomic
from lmlab.moe.offload import ENGINE_REVISION, THREAD_NAME, OffloadConfig, OffloadEngine, make_tier, save_expert_store
from lmlab.moe.pregated import PreGatedMoEForCausalLM, build

VARIANTS = {  # name -> (policy, use LRU slots, copier)
    "resident": ("resident", False, "auto"), "on_demand": ("on_demand", False, "auto"),
    "prefetch_all": ("prefetch_all", False, "auto"), "pregated": ("pregated", False, "auto"),
    "on_demand+lru": ("on_demand", True, "auto"), "pregated+lru": ("pregated", True, "auto"),
    "pregated/thread": ("pregated", False, "thread"),  # CPU tiers: copies on a Python thread instead of a process
}
PRESETS = {
    "cpu": dict(layers=8, hidden=128, expert_hidden=512, heads=4, tiers="mmap,disk,link"),
    # GPU: experts big enough (33.6 MB fp32 each) that PCIe copies matter next to a launch-bound decode step
    "gpu": dict(layers=8, hidden=1024, expert_hidden=4096, heads=16, tiers="cuda"),
}


def run_once(model, store_path, variant: str, tier, args, prompts, device: str) -> dict:
    policy, lru, copier = VARIANTS[variant]
    cfg = OffloadConfig(policy=policy, lru_slots=args.lru_slots if lru else 0, max_batch=args.batch, device=device,
                        copier=copier)
    with OffloadEngine(model, store_path, tier=tier, config=cfg) as eng:
        res = eng.generate(prompts, args.new_tokens)
    m = res.metrics
    return {"median_latency_s": m.median_latency_s, "block_s": m.median_block_latency_s,
            "tokens_per_s": m.tokens_per_s, "stall_s": m.stall_per_step_s,
            "stolen": m.stolen,
            "peak_resident_bytes": m.peak_resident_bytes, "peak_resident_experts": m.peak_resident_experts,
            "slot_bytes": m.slot_bytes, "bytes_moved": m.bytes_moved, "hit_rate": m.hit_rate, "hits": m.hits,
            "late": m.late, "misses": m.misses, "prefetches": m.prefetches,
            "active_experts_per_block": m.active_experts_per_block, "setup_s": m.setup_s, "copier": m.copier,
            "tokens": res.tokens.tolist()}


def summarise(runs: list[dict]) -> dict:
    med = statistics.median
    out = {"median_latency_s": med(r["median_latency_s"] for r in runs),
           "round_latency_s": [r["median_latency_s"] for r in runs],
           "tokens_per_s": med(r["tokens_per_s"] for r in runs),
           "stall_s_per_step": None if runs[0]["stall_s"] is None else med(r["stall_s"] for r in runs),
           "stolen": med(r["stolen"] for r in runs),
           "peak_resident_bytes": max(r["peak_resident_bytes"] for r in runs),
           "peak_resident_experts": max(r["peak_resident_experts"] for r in runs),
           "slot_bytes": runs[0]["slot_bytes"], "bytes_moved": med(r["bytes_moved"] for r in runs),
           "hit_rate": statistics.fmean(r["hit_rate"] for r in runs), "misses": med(r["misses"] for r in runs),
           "late": med(r["late"] for r in runs), "setup_s": med(r["setup_s"] for r in runs),
           "copier": runs[0]["copier"]}
    return out


def h2d_gbps(nbytes: int, device: str, repeats: int = 20) -> float:
    """Speed of the cuda tier's link: one expert's bytes copied from pinned host memory to the GPU on a side
    stream, as the tier's loads are, timed by CUDA events (median of ``repeats`` after 3 warm-ups), in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream, times = torch.cuda.Stream(device), []
    with torch.cuda.stream(stream):
        for _ in range(repeats + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[3:]) / 1e9


def paired(res: dict, a: str, b: str) -> float:
    """Median over rounds of a's latency / b's in the same round (rounds run every variant back to back, so a
    ratio within a round cancels the slow drifts of a shared machine that a ratio of medians keeps)."""
    return statistics.median(x / y for x, y in zip(res[a]["round_latency_s"], res[b]["round_latency_s"], strict=True))


def measure(model, store_path, variants, tier_factory, args, prompts, device, rounds: int, on_resident=None) -> dict:
    """Alternating rounds: round r runs the variants in an order rotated by r; returns variant -> summary.

    With ``on_resident`` (the emulated link), every round starts with the resident run (which moves no expert while
    decoding) and hands its time in the blocks to ``on_resident``, which re-sets the link's speed for the round:
    the shared dev VM's speed drifts by up to 2x for seconds at a time, and a link calibrated once would then no
    longer be r times the compute."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for v in variants:  # warm-up (allocator, page cache of the non-expert weights), not recorded
        run_once(model, store_path, v, tier_factory(), args, prompts, device)
    for r in range(rounds):
        rest = [v for v in variants if v != "resident"] if on_resident else variants
        order = rest[r % len(rest):] + rest[:r % len(rest)]
        if on_resident:
            runs["resident"].append(run_once(model, store_path, "resident", tier_factory(), args, prompts, device))
            on_resident(runs["resident"][-1]["block_s"])
        for v in order:
            runs[v].append(run_once(model, store_path, v, tier_factory(), args, prompts, device))
    tokens = {v: runs[v][0]["tokens"] for v in variants}
    ref = tokens[variants[0]]
    out = {v: summarise(runs[v]) for v in variants}
    for v in variants:
        out[v]["per_round_stall_s"] = [x["stall_s"] for x in runs[v]]
        if "resident" in runs:
            out[v]["x_resident"] = paired(out, v, "resident")
    out["_identical_tokens"] = all(t == ref for t in tokens.values()) and all(
        x["tokens"] == ref for v in variants for x in runs[v])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu (default here) or gpu")
    ap.add_argument("--model", default=None, help="a trained PreGatedMoEForCausalLM folder (default: random init)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--expert-hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (the paper: 1)")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--tiers", default=None, help="comma-separated: mmap,disk,link,cuda")
    ap.add_argument("--link-ratio", type=float, default=1.0,
                    help="link time of one block's active experts / compute time of one block (headline)")
    ap.add_argument("--latency-us", type=float, default=10.0, help="per-transfer latency of the emulated link")
    ap.add_argument("--sweep", default="0.5,1,2,4", help="link ratios for the latency curve ('' to skip)")
    ap.add_argument("--lru-slots", type=int, default=None,
                    help="extra slots of the +lru variants (default: A per block, the last token's experts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default results/pregated.json ($OUT/pregated_cuda.json for gpu)")
    ap.add_argument("--plot", default=None, help="PNG path (default: beside --out)")
    ap.add_argument("--gpu-results", nargs="*", default=[],
                    help="CPU run: --preset gpu result files to record under `gpu` (earlier ones are kept)")
    args = ap.parse_args()
    preset = PRESETS[args.preset or ("gpu" if args.tiers == "cuda" else "cpu")]
    for key, val in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    tiers = [t for t in args.tiers.split(",") if t]
    if args.out is None:
        gpu = tiers == ["cuda"]
        name = "pregated_cuda.json" if gpu else "pregated.json"
        args.out = str(Path(os.environ["OUT"]) / name) if gpu and os.environ.get("OUT") else f"results/{name}"
    torch.set_num_threads(args.threads)
    device = "cuda" if "cuda" in tiers else "cpu"
    if device == "cuda" and tiers != ["cuda"]:
        sys.exit("run the cuda tier on its own (--tiers cuda): CPU tiers keep experts in CPU memory")

    if args.model:
        model = PreGatedMoEForCausalLM.from_pretrained(args.model).eval()
        c = model.config
        args.layers, args.hidden, args.expert_hidden = c.num_hidden_layers, c.hidden_size, c.expert_hidden_size
        args.experts, args.top_k, args.vocab = c.num_experts, c.num_experts_per_tok, c.vocab_size
    else:
        model = build(pregated=True, vocab_size=args.vocab, seed=args.seed, hidden_size=args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      expert_hidden_size=args.expert_hidden, num_experts=args.experts,
                      num_experts_per_tok=args.top_k,
                      max_position_embeddings=args.prompt_tokens + args.new_tokens + 8)
    active = min(args.experts, args.batch * args.top_k)
    if args.lru_slots is None:
        args.lru_slots = active * args.layers
    work = Path(tempfile.mkdtemp(prefix="lmlab-pregated-bench-"))
    store_path = save_expert_store(model, work / "experts.safetensors")
    expert_bytes = model.expert_bytes()
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens), generator=g)
    variants = list(VARIANTS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}; model: {args.layers} "
          f"blocks x {args.experts} experts (top-{args.top_k}), D={args.hidden}, H={args.expert_hidden}, "
          f"{expert_bytes / 1e6:.2f} MB per expert, {args.layers * args.experts * expert_bytes / 1e6:.0f} MB of "
          f"experts; batch {args.batch}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
          f"{args.rounds} rounds", flush=True)

    results: dict = {"tiers": {}}
    t_start = time.perf_counter()
    calib = None
    if device == "cpu":  # per-block compute time (the L blocks of a resident decode step / L), for the link's speed
        lat = [run_once(model, store_path, "resident", make_tier("mmap"), args, prompts, device)["block_s"]
               for _ in range(8)][3:]  # the first runs fault in the allocator's pages: not the steady state
        calib = statistics.median(lat) / args.layers
        print(f"calibration: resident {statistics.median(lat) * 1e3:.2f} ms/token in the blocks -> "
              f"{calib * 1e3:.3f} ms per block", flush=True)

    def link_gbps(ratio: float, block_s: float | None = None) -> float:
        """A experts in ratio * one block's compute time (minus the per-transfer latency)."""
        budget = ratio * (block_s or calib) - active * args.latency_us * 1e-6
        return active * expert_bytes / max(budget, 1e-6) / 1e9

    link = {"gbps": 0.0, "rounds": []}

    def link_factory():
        return make_tier("link", gbps=link["gbps"], latency_us=args.latency_us)

    def relink(ratio: float):  # returns the per-round hook: link speed from the resident run's time in the blocks
        link.update(gbps=link_gbps(ratio), rounds=[])

        def update(resident_blocks_s: float) -> None:
            link["gbps"] = link_gbps(ratio, resident_blocks_s / args.layers)
            link["rounds"].append(link["gbps"])
        return update

    for tier_name in tiers:
        kw, on_resident = {}, None
        t0 = time.perf_counter()
        shared = make_tier("cuda") if tier_name == "cuda" else None  # pins the experts once for all runs
        factory = (lambda s=shared: s) if shared is not None else (lambda n=tier_name: make_tier(n))
        if tier_name == "link":
            factory, on_resident = link_factory, relink(args.link_ratio)
            kw = {"latency_us": args.latency_us}  # gbps: set per round, recorded below
        res = measure(model, store_path, variants, factory, args, prompts, device, args.rounds, on_resident)
        if shared is not None:
            shared.release()
        res["_tier"] = {"name": tier_name, **kw, "seconds": time.perf_counter() - t0}
        if tier_name == "link":
            res["_tier"].update(ratio=args.link_ratio, gbps=statistics.median(link["rounds"]),
                                round_gbps=link["rounds"])
        if tier_name == "cuda":  # the real link's r (the link tier's knob): a step's expert bytes / resident step
            gbps = h2d_gbps(expert_bytes, device)  # (per-token latencies: block times are not synchronised on a GPU)
            step_s = args.layers * active * expert_bytes / gbps / 1e9  # a decode step's expert bytes on the link
            res["_tier"].update(gbps=gbps, link_s_per_step=step_s,
                                ratio=step_s / res["resident"]["median_latency_s"],
                                pregated_over_link=res["pregated"]["median_latency_s"] / step_s)
            print(f"[cuda] pinned host -> GPU copies: {gbps:.1f} GB/s; a decode step's expert bytes take "
                  f"{step_s * 1e3:.2f} ms on the link, r = {res['_tier']['ratio']:.2f} x a resident step; "
                  f"pregated takes {res['_tier']['pregated_over_link']:.2f}x that link time per step", flush=True)
        results["tiers"][tier_name] = res
        print_table(tier_name, res, variants, active, expert_bytes)

    sweep = [float(x) for x in args.sweep.split(",") if x] if device == "cpu" and "link" in tiers else []
    results["sweep"] = []
    for ratio in sweep:
        sv = ["resident", "on_demand", "prefetch_all", "pregated"]
        res = measure(model, store_path, sv, link_factory, args, prompts, device, max(3, args.rounds // 2),
                      relink(ratio))
        gb = statistics.median(link["rounds"])
        row = {"ratio": ratio, "gbps": gb, **{v: res[v]["median_latency_s"] for v in sv},
               "x_resident": {v: res[v]["x_resident"] for v in sv}, "identical_tokens": res["_identical_tokens"]}
        results["sweep"].append(row)
        print(f"sweep r={ratio:g} ({gb:.2f} GB/s): " + "  ".join(
            f"{v} {row[v] * 1e3:.2f} ms ({row['x_resident'][v]:.2f}x)" for v in sv), flush=True)
    leftover = [t.name for t in threading.enumerate() if t.name == THREAD_NAME]

    head = "link" if "link" in results["tiers"] else tiers[0]
    h = results["tiers"][head]
    vs_res, vs_od, vs_pa = (h["pregated"]["x_resident"], paired(h, "on_demand", "pregated"),
                            paired(h, "prefetch_all", "pregated"))
    of_medians = h["pregated"]["median_latency_s"] / h["resident"]["median_latency_s"]
    peak_ratio = h["pregated"]["peak_resident_experts"] / active
    mem_saving = h["resident"]["peak_resident_bytes"] / h["pregated"]["peak_resident_bytes"]
    ok = [vs_res <= 1.25, vs_od >= 1.5, peak_ratio <= 2.0]
    identical = all(r["_identical_tokens"] for r in results["tiers"].values())
    print(f"\n[{head}] pregated / resident latency: {vs_res:.2f}x (target <= 1.25)   on_demand / pregated: "
          f"{vs_od:.2f}x (target >= 1.5)   prefetch_all / pregated: {vs_pa:.2f}x")
    print(f"[{head}] pregated peak expert memory: {peak_ratio:.1f} x active experts per block (target <= 2); "
          f"resident holds {mem_saving:.1f}x more;  identical tokens across policies and tiers: {identical}")
    where = {"link": f"emulated link at r={args.link_ratio:g} (median {h['_tier'].get('gbps', 0):.2f} GB/s, set "
                     f"each round from its resident run; {args.latency_us:g} us/transfer)",
             "cuda": f"{torch.cuda.get_device_name(0) if device == 'cuda' else ''} cuda tier (pinned CPU -> GPU "
                     f"copies on a side stream)"}.get(head, f"{head} tier")
    n_ok = sum(ok)
    ours = (f"{where}: pregated {vs_res:.2f}x resident latency (median of per-round ratios; {of_medians:.2f}x as a "
            f"ratio of medians), {vs_od:.2f}x faster than on_demand, {vs_pa:.2f}x faster than prefetch_all, peak "
            f"experts {peak_ratio:.1f}x active ({mem_saving:.0f}x less than resident)")
    reproduced = ("yes" if n_ok == 3 else "partly" if n_ok else "no") + f": {n_ok}/3 targets met on the {head} tier"
    command = ("`python benchmarks/pregated.py`" if device == "cpu"
               else "`PYTHONPATH=src python3 benchmarks/pregated.py --preset gpu`")
    if device == "cpu":
        copier = h["pregated"]["copier"]
        ours += (f"; copies by the {copier} copier"
                 + (f" (a Python thread instead: {h['pregated/thread']['x_resident']:.2f}x resident)"
                    if "pregated/thread" in h and copier != "thread" else ""))
        reproduced += ("; CPU emulation of a link: its time is a reserved time-line and the bytes are copied by "
                       f"the {copier} copier, not a GPU's copy engine")
        gpu = recorded_gpu(args.out, args.gpu_results)
        if gpu:  # GPU runs recorded earlier in this file (a CPU run cannot measure them): kept, and summarised
            results["gpu"] = gpu
            runs = sorted((r for r in gpu.values() if isinstance(r, dict) and "pregated_over_resident" in r),
                          key=lambda r: -r["expert_bytes"])
            ours += "; recorded GPU runs (cuda tier): " + "; ".join(
                f"{r['env']['gpu']}, {r['expert_bytes'] / 1e6:.1f} MB experts: {r['pregated_over_resident']:.2f}x "
                f"resident, {r['on_demand_over_pregated']:.2f}x faster than on_demand" + gpu_link_note(r)
                + gpu_revision_note(r) for r in runs)
            command += (" (CPU tiers); GPU runs: `PYTHONPATH=src python3 benchmarks/pregated.py --preset gpu "
                        "[--expert-hidden 1024]` on a GPU machine, recorded under `gpu`")
            reproduced += "; GPU runs: " + "; ".join(
                f"{r['expert_bytes'] / 1e6:.1f} MB experts {sum(r['targets_met'].values())}/3 targets"
                + ("" if r["targets_met"]["latency_vs_resident<=1.25"] else
                   f" (latency {r['pregated_over_resident']:.2f}x resident)") + gpu_revision_note(r) for r in runs)
    results.update({
        "benchmark": "pregated", "engine_revision": ENGINE_REVISION, "config": vars(args), "device": device,
        "calibration_block_s": calib,
        "expert_bytes": expert_bytes, "active_experts_per_block": active, "headline_tier": head,
        "pregated_over_resident": vs_res, "pregated_over_resident_of_medians": of_medians,
        "on_demand_over_pregated": vs_od, "prefetch_all_over_pregated": vs_pa,
        "pregated_peak_over_active": peak_ratio, "resident_over_pregated_memory": mem_saving,
        "targets_met": {"latency_vs_resident<=1.25": ok[0], "speedup_vs_on_demand>=1.5": ok[1],
                        "peak_memory<=2x_active": ok[2]},
        "identical_tokens": identical, "threads_left_running": leftover,
        "seconds": time.perf_counter() - t_start,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                "loadavg": os.getloadavg()},
        "summary": {
            "claim": "Pre-gated MoE: prefetching the next block's pre-gated experts hides transfer latency with "
                     "a small resident set (arXiv 2308.12066, Figs. 10-12)",
            "paper": "faster than offloading baselines, near GPU-only speed, much less GPU memory (Switch "
                     "Transformer on a GPU; abstract: improves performance, reduces GPU memory)",
            "ours": ours,
            "command": command,
            "reproduced": reproduced,
        },
    })
    write_json_atomic(args.out, results)
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    try:
        make_plot(results, variants, plot, head)
        print(f"wrote {args.out} and {plot}")
    except ImportError:
        print(f"wrote {args.out} (matplotlib missing: no plot)")


def gpu_revision_note(run: dict) -> str:
    """'' for a GPU run of this engine revision; else says which revision it measured (runs recorded before
    revisions were recorded are revision 1)."""
    rev = run.get("engine_revision", 1)
    return "" if rev == ENGINE_REVISION else f" (engine revision {rev}, not yet re-run on revision {ENGINE_REVISION})"


def gpu_link_note(run: dict) -> str:
    """The measured host -> GPU link of a cuda run (runs before it was measured: '')."""
    t = run.get("tiers", {}).get("cuda", {}).get("_tier", {})
    if "gbps" not in t:
        return ""
    return (f" (link {t['gbps']:.0f} GB/s: a step's expert bytes take r = {t['ratio']:.2f}x a resident step, and "
            f"pregated {t['pregated_over_link']:.2f}x that link time)")


def recorded_gpu(path: str, new_runs: list[str]) -> dict | None:
    """GPU runs to keep beside a CPU run: the ``gpu`` block of the earlier results file at ``path`` (a CPU run keeps
    rather than drops it), updated with the ``--preset gpu`` result files ``new_runs`` (``--gpu-results``), each
    stored verbatim under ``expert_hidden_<H>``."""
    try:
        gpu = json.loads(Path(path).read_text()).get("gpu") or {}
    except (OSError, ValueError, AttributeError):
        gpu = {}
    for f in new_runs:
        try:
            run = json.loads(Path(f).read_text())
            key = f"expert_hidden_{run['config']['expert_hidden']}"
            if run.get("device") != "cuda":
                raise ValueError("not a --preset gpu run")
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"--gpu-results {f}: not a results file of `benchmarks/pregated.py --preset gpu` ({e})")
        gpu[key] = run
    return gpu or None


def print_table(tier: str, res: dict, variants, active: int, expert_bytes: int) -> None:
    extra = res["_tier"]
    desc = f" ({extra['gbps']:.2f} GB/s, r={extra['ratio']:g})" if tier == "link" else ""
    print(f"\n== tier {tier}{desc}: identical tokens across policies: {res['_identical_tokens']}")
    print(f"{'policy':<15}{'ms/token':>10}{'x resident':>11}{'tok/s':>9}{'stall ms/step':>14}{'hit rate':>9}"
          f"{'misses':>8}{'peak experts':>13}{'peak MB':>9}{'moved MB':>10}")
    for v in variants:
        r = res[v]
        stall = "-" if r["stall_s_per_step"] is None else f"{r['stall_s_per_step'] * 1e3:.2f}"
        print(f"{v:<15}{r['median_latency_s'] * 1e3:>10.2f}{r['x_resident']:>11.2f}"
              f"{r['tokens_per_s']:>9.1f}{stall:>14}{r['hit_rate']:>9.2f}{r['misses']:>8.0f}"
              f"{r['peak_resident_experts']:>13}{r['peak_resident_bytes'] / 1e6:>9.1f}{r['bytes_moved'] / 1e6:>10.1f}")
    sys.stdout.flush()


def make_plot(results: dict, variants, path: str, head: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(results["tiers"])
    n = 2 + bool(results["sweep"])
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2))
    width = 0.8 / len(tiers)
    for j, t in enumerate(tiers):
        r = results["tiers"][t]
        axes[0].bar([i + j * width for i in range(len(variants))], [r[v]["median_latency_s"] * 1e3 for v in variants],
                    width, label=t)
    axes[0].set_xticks([i + width * (len(tiers) - 1) / 2 for i in range(len(variants))], variants, rotation=30,
                       ha="right")
    axes[0].set_ylabel("decode latency, ms/token (median)")
    axes[0].set_title("latency by policy and tier")
    axes[0].legend()
    h = results["tiers"][head]
    axes[1].bar(variants, [h[v]["peak_resident_bytes"] / 1e6 for v in variants], color="tab:gray")
    axes[1].set_ylabel("peak resident expert MB")
    axes[1].set_title(f"expert memory ({head} tier)")
    axes[1].tick_params(axis="x", rotation=30)
    if results["sweep"]:
        xs = [row["ratio"] for row in results["sweep"]]
        for v in ("on_demand", "prefetch_all", "pregated"):
            axes[2].plot(xs, [row["x_resident"][v] for row in results["sweep"]], marker="o", label=v)
        axes[2].axhline(1.0, color="k", ls="--", label="resident")
        axes[2].axhline(1.25, color="tab:red", ls=":", label="target for pregated at r=1")
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log", base=2)
        axes[2].set_xlabel("link ratio r = transfer(active experts of a block) / compute(block)")
        axes[2].set_ylabel("latency / resident latency (same round)")
        axes[2].set_title("emulated link: latency vs bandwidth")
        axes[2].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
