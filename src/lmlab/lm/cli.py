"""CLI for the LM substrate: `lmlab models ...` and `lmlab lm ...`."""

from __future__ import annotations

import click


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
