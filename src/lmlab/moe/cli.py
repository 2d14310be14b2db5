"""``lmlab moe``: train and evaluate ViTs with dense, Soft MoE, token-choice, expert-choice or EWA MLPs.

    lmlab moe train --mlp soft --experts 8 --moe-layers 2 --steps 1500 --out runs/vit-soft
    lmlab moe train --ewa --ewa-beta 0.3 --experts 4 --out runs/vit-ewa     # saves the collapsed plain ViT
    lmlab moe eval runs/vit-soft
"""

from __future__ import annotations

import json

import click

from lmlab.cli import MAX_THREADS, at_least, between, greater_than, thread_count

MLP_KINDS = ("dense", "soft", "token_choice", "expert_choice", "ewa")


@click.group("moe")
def moe_group():
    """Mixtures of experts: Soft MoE, token/expert choice, EWA, on a ViT trained on Fashion-MNIST."""


@moe_group.command("train")
@click.option("--mlp", "kind", type=click.Choice(MLP_KINDS), default="soft", show_default=True,
              help="MLP of the last --moe-layers blocks.")
@click.option("--ewa", is_flag=True, help="EWA training: --mlp ewa, averaging with --ewa-beta, collapsed at the end.")
@click.option("--ewa-beta", type=float, default=0.3, show_default=True, callback=between(0, 1),
              help="EWA share rate beta.")
@click.option("--experts", "num_experts", type=int, default=8, show_default=True, callback=at_least(1))
@click.option("--moe-layers", type=int, default=2, show_default=True, callback=at_least(0),
              help="How many of the last blocks are MoE.")
@click.option("--capacity-factor", type=float, default=1.0, show_default=True, callback=greater_than(0))
@click.option("--k", type=int, default=1, show_default=True, callback=at_least(1),
              help="Token choice: experts per token.")
@click.option("--dim", type=int, default=64, show_default=True)
@click.option("--depth", type=int, default=4, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--patch-size", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=1500, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, callback=greater_than(0))
@click.option("--seed", type=int, default=0, show_default=True, callback=at_least(0))
@click.option("--data", "data_root", default=None, help="Folder with the Fashion-MNIST IDX files.")
@click.option("--val-size", type=int, default=5000, show_default=True)
@click.option("--train-size", type=int, default=None, help="Use only this many training images.")
@click.option("--threads", type=int, default=0, callback=thread_count,
              help=f"torch threads (0: torch's default; at most {MAX_THREADS}).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
def train_cmd(kind, ewa, ewa_beta, num_experts, moe_layers, capacity_factor, k, dim, depth, heads, patch_size, steps,
              batch_size, lr, seed, data_root, val_size, train_size, threads, out):
    """Train a ViT classifier on Fashion-MNIST; report validation and test accuracy; save it."""
    import torch

    from lmlab.moe.data import load_fashion_mnist
    from lmlab.moe.ewa import collapse_experts
    from lmlab.moe.layers import MoEConfig
    from lmlab.moe.train import (
        TrainConfig,
        check_model_folder,
        evaluate,
        save_model,
        train_classifier,
        train_config_dict,
    )
    from lmlab.moe.vit import ViT, ViTConfig

    if threads:
        torch.set_num_threads(threads)
    if ewa:
        kind = "ewa"
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed,  # checked before the data loads
                         ewa_beta=ewa_beta if kind == "ewa" else 0.0)
    check_model_folder(out)  # before training: --out is replaced at the end, and only an earlier model may be
    data = load_fashion_mnist(data_root, val_size=val_size, seed=seed, train_size=train_size)
    moe = None if kind == "dense" else MoEConfig(kind=kind, num_experts=num_experts, capacity_factor=capacity_factor,
                                                 k=k)
    vit_config = ViTConfig(dim=dim, depth=depth, heads=heads, mlp_hidden=4 * dim, patch_size=patch_size, moe=moe,
                           moe_layers=0 if moe is None else moe_layers)
    torch.manual_seed(seed)
    model = ViT(vit_config)
    result = train_classifier(model, data.train, config, progress=True)
    if kind == "ewa":
        model = collapse_experts(model)
    metrics = {"val_accuracy": evaluate(model, data.val) if len(data.val) else None,
               "test_accuracy": evaluate(model, data.test),
               "median_step_seconds": result.median_step_seconds, "final_loss": result.losses[-1]}
    save_model(model, out, info={"train_config": train_config_dict(config), "metrics": metrics,
                                 "trained_as": kind})
    click.echo(json.dumps({"out": out, **metrics}))


@moe_group.command("eval")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--data", "data_root", default=None, help="Folder with the Fashion-MNIST IDX files.")
def eval_cmd(folder, data_root):
    """Test accuracy of a checkpoint written by `lmlab moe train`."""
    from lmlab.moe.data import load_split
    from lmlab.moe.train import evaluate, load_model

    model, _ = load_model(folder)
    click.echo(json.dumps({"folder": folder, "test_accuracy": evaluate(model, load_split("test", data_root))}))


from lmlab.moe.offload.cli import generate_cmd  # noqa: E402  (issue 6: offloaded pre-gated inference)

moe_group.add_command(generate_cmd)
