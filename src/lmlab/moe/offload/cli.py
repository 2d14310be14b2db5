"""`lmlab moe generate`: greedy generation from a pre-gated (or conventional) MoE LM with offloaded experts.

Register under the moe group with ``moe_group.add_command(generate_cmd)`` (lmlab.moe.cli).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmlab.errors import CheckpointError, DataError, ModelNotFoundError, first_line


def _load_model(model_dir: str):
    """The pre-gated MoE LM saved in ``model_dir``; a folder that is not one (no or another config, missing,
    truncated or mismatched weights) is a one-line :class:`ModelNotFoundError`/:class:`CheckpointError`."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from lmlab.moe.pregated import MODEL_TYPE, PreGatedMoEForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{model_dir} is not a model folder ({first_line(e)}): save a pre-gated MoE LM "
                                 "there with model.save_pretrained(MODEL_DIR)") from None
    if config.model_type != MODEL_TYPE:
        raise ModelNotFoundError(f"{model_dir} holds a {config.model_type!r} model, not a pre-gated MoE LM "
                                 f"({MODEL_TYPE!r})")
    try:
        model, info = PreGatedMoEForCausalLM.from_pretrained(model_dir, config=config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot load the weights in {model_dir} ({first_line(e)}): save the model again "
                              "with model.save_pretrained(MODEL_DIR)") from None
    bad = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
    if bad:
        raise CheckpointError(f"the weights in {model_dir} do not fit its config ({len(bad)} missing or mismatched, "
                              f"e.g. {bad[0]}): save the model again with model.save_pretrained(MODEL_DIR)")
    return model.eval()


def _store_is_current(path: Path, model) -> bool:
    """Whether ``path`` is an expert store written from ``model``'s expert weights (a store without a fingerprint,
    from an older lmlab, or one that does not open counts as not current)."""
    from lmlab.moe.offload import ExpertStore

    if not path.is_file():
        return False
    try:
        with ExpertStore(path) as st:
            return st.matches(model) is True
    except DataError:
        return False


@click.command("generate")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="Text to continue; repeat for a batch (any lengths: left-padded).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--policy", type=click.Choice(["resident", "on_demand", "prefetch_all", "pregated"]),
              default="pregated", show_default=True)
@click.option("--tier", type=click.Choice(["mmap", "disk", "link", "cuda"]), default="mmap", show_default=True)
@click.option("--gbps", default=8.0, show_default=True, help="Link bandwidth (GB/s) of --tier link.")
@click.option("--latency-us", default=10.0, show_default=True, help="Per-transfer latency of --tier link.")
@click.option("--lru-slots", default=0, show_default=True, help="Extra slots caching recently used experts.")
@click.option("--copier", type=click.Choice(["auto", "process", "thread"]), default="auto", show_default=True,
              help="Who copies prefetched experts on a CPU tier: a child process or a Python thread.")
@click.option("--store", type=click.Path(), default=None,
              help="Expert store (default MODEL_DIR/experts.safetensors, rewritten unless written from this model; "
                   "a given path is written if missing, refused if written from other weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def generate_cmd(model_dir, prompts, max_new_tokens, policy, tier, gbps, latency_us, lru_slots, copier, store,
                 as_json):
    """Generate with experts streamed from a safetensors store (policies: resident/on_demand/prefetch_all/pregated)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmlab.moe.offload import OffloadConfig, OffloadEngine, make_tier, save_expert_store

    hf_logging.disable_progress_bar()
    model = _load_model(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{model_dir} has no tokenizer that loads ({first_line(e)}): save one there with "
                                 "tokenizer.save_pretrained(MODEL_DIR)") from None
    store_path = Path(store) if store else Path(model_dir) / "experts.safetensors"
    # the default store is a cache of MODEL_DIR's experts: rewrite it unless it was written from these weights;
    # an explicit --store is written only if missing (the engine refuses one written from other weights)
    write = not store_path.exists() if store else not _store_is_current(store_path, model)
    if write:
        try:
            save_expert_store(model, store_path)
        except OSError as e:
            raise DataError(f"cannot write the expert store {store_path} ({e}): pass --store PATH") from None
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if not all(ids):
        raise click.UsageError("every --prompt needs at least one token")
    device = "cuda" if tier == "cuda" else "cpu"
    cfg = OffloadConfig(policy=policy, lru_slots=lru_slots, max_batch=len(ids), device=device, copier=copier)
    with torch.no_grad(), OffloadEngine(model, store_path, tier=make_tier(tier, gbps=gbps, latency_us=latency_us),
                                        config=cfg) as eng:
        res = eng.generate(ids, max_new_tokens)
    m = res.metrics
    if as_json:
        d = m.to_dict()
        d["texts"] = [tok.decode(row) for row in res.tokens]
        click.echo(json.dumps(d, indent=2))
        return
    for prompt, row in zip(prompts, res.tokens, strict=True):
        click.echo(prompt + tok.decode(row))
    stall = "-" if m.stall_s is None else f"{m.stall_per_step_s * 1e3:.2f} ms/step"
    click.echo(f"[{policy} / {tier} / copier {m.copier}] prefill {m.prefill_s * 1e3:.1f} ms "
               f"({m.prompt_tokens} tokens), decode "
               f"{m.median_latency_s * 1e3:.2f} ms/token, {m.tokens_per_s:.1f} tokens/s, "
               f"peak {m.peak_resident_experts} experts ({m.peak_resident_bytes / 1e6:.1f} MB), "
               f"moved {m.bytes_moved / 1e6:.1f} MB, hit rate {m.hit_rate:.2f}, stall {stall}", err=True)
