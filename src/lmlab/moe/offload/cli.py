"""`lmlab moe generate`: greedy generation from a pre-gated (or conventional) MoE LM with offloaded experts.

Register under the moe group with ``moe_group.add_command(generate_cmd)`` (lmlab.moe.cli).
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("generate")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--policy", type=click.Choice(["resident", "on_demand", "prefetch_all", "pregated"]),
              default="pregated", show_default=True)
@click.option("--tier", type=click.Choice(["mmap", "disk", "link", "cuda"]), default="mmap", show_default=True)
@click.option("--gbps", default=8.0, show_default=True, help="Link bandwidth (GB/s) of --tier link.")
@click.option("--latency-us", default=10.0, show_default=True, help="Per-transfer latency of --tier link.")
@click.option("--lru-slots", default=0, show_default=True, help="Extra slots caching recently used experts.")
@click.option("--store", type=click.Path(), default=None,
              help="Expert store (default MODEL_DIR/experts.safetensors, written from the model if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def generate_cmd(model_dir, prompt, max_new_tokens, policy, tier, gbps, latency_us, lru_slots, store, as_json):
    """Generate with experts streamed from a safetensors store (policies: resident/on_demand/prefetch_all/pregated)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmlab.moe.offload import OffloadConfig, OffloadEngine, make_tier, save_expert_store
    from lmlab.moe.pregated import PreGatedMoEForCausalLM

    hf_logging.disable_progress_bar()
    model = PreGatedMoEForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    store_path = Path(store) if store else Path(model_dir) / "experts.safetensors"
    if not store_path.exists():
        save_expert_store(model, store_path)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    device = "cuda" if tier == "cuda" else "cpu"
    cfg = OffloadConfig(policy=policy, lru_slots=lru_slots, device=device)
    with torch.no_grad(), OffloadEngine(model, store_path, tier=make_tier(tier, gbps=gbps, latency_us=latency_us),
                                        config=cfg) as eng:
        res = eng.generate(ids, max_new_tokens)
    m = res.metrics
    if as_json:
        d = m.to_dict()
        d["text"] = tok.decode(res.tokens[0])
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(prompt + tok.decode(res.tokens[0]))
    stall = "-" if m.stall_s is None else f"{m.stall_per_step_s * 1e3:.2f} ms/step"
    click.echo(f"[{policy} / {tier}] {m.median_latency_s * 1e3:.2f} ms/token, {m.tokens_per_s:.1f} tokens/s, "
               f"peak {m.peak_resident_experts} experts ({m.peak_resident_bytes / 1e6:.1f} MB), "
               f"moved {m.bytes_moved / 1e6:.1f} MB, hit rate {m.hit_rate:.2f}, stall {stall}", err=True)
