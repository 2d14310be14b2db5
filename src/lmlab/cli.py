"""The `lmlab` command line: one sub-command group per family, imported only when used.

``lmlab --help`` imports none of torch, transformers or a family's code, so it starts in well under
a second (tests/test_cli.py measures it). A family adds itself with one line in :data:`COMMANDS`.
User errors (:class:`lmlab.errors.LmlabError`) print one line and exit 2; no tracebacks.
"""

from __future__ import annotations

import importlib
import math
import sys

import click

from lmlab.errors import ConfigError, LmlabError

# name -> ("module:attribute", one-line help shown by `lmlab --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "ls": ("lmlab.cli:ls_command", "List every technique of the roundup and its status."),
    "models": ("lmlab.lm.cli:models_group", "Models that load here (named, tiny presets, local folders)."),
    "lm": ("lmlab.lm.cli:lm_group", "The LM substrate: tokenizer, training, perplexity, demo."),
    "serve-lm": ("lmlab.lm.server:serve_lm_command", "Serve a model with an OpenAI-compatible HTTP API."),
    "corpus": ("lmlab.corpus.cli:corpus_group", "Licensed corpora: harvest, store, stats, split (SPDX licences)."),
    "silo": ("lmlab.silo.cli:silo_group", "SILO: datastore, kNN-LM, RIC-LM, attribution, opt-out, server."),
    "moe": ("lmlab.moe.cli:moe_group", "Mixtures of experts: Soft MoE, token/expert choice, EWA, ViT training."),
    "tools": ("lmlab.tools.cli:tools_group", "Tool use: API catalogues, retrieval, tool-documentation prompting."),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use (click's documented lazy pattern)."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        mod_name, attr = target.split(":")
        return getattr(importlib.import_module(mod_name), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _number_check(ok, describe: str):
    def check(ctx, param, value):
        if value is not None and not (ok(value) and math.isfinite(value)):  # NaN fails every comparison
            raise ConfigError(f"{param.opts[0]} must be {describe}, not {value}")
        return value

    return check


def at_least(lo: float):
    """A click option callback refusing a number below ``lo`` (or NaN, or infinite) with one line (ConfigError:
    exit 2, no usage dump). ``greater_than`` and ``between`` do the same for an open bound and a closed range."""
    return _number_check(lambda v: v >= lo, f"at least {lo}")


MAX_THREADS = 256  # more is never faster, and OpenBLAS crashes (SIGSEGV) when it cannot start that many threads


def thread_count(ctx, param, value):
    """The callback of every ``--threads`` option: 0 (torch's default) to :data:`MAX_THREADS`."""
    at_least(0)(ctx, param, value)
    if value is not None and value > MAX_THREADS:
        raise ConfigError(f"{param.opts[0]} must be at most {MAX_THREADS}, not {value}")
    return value


def greater_than(lo: float):
    return _number_check(lambda v: v > lo, f"greater than {lo}")


def between(lo: float, hi: float):
    return _number_check(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmlab")
def cli():
    """lmlab: the August 2023 research roundup as components for your own models and data."""


@click.command("ls")
@click.option("--markdown", is_flag=True, help="Print README's technique table instead.")
@click.option("--family", default=None, help="Only this family (silo, moe, curate, ...).")
def ls_command(markdown: bool, family: str | None):
    """List every technique of the roundup: paper, module, command, recipe and status."""
    from lmlab import registry

    families = sorted({t.family for t in registry.TECHNIQUES})
    if family is not None and family not in families:
        raise ConfigError(f"unknown --family {family!r}: choose from {', '.join(families)}")
    if markdown:
        click.echo(registry.markdown_table(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("key", "arXiv", "family", "command", "status", "title"):
        table.add_column(col, overflow="fold")
    for t in registry.TECHNIQUES:
        if family and t.family != family:
            continue
        table.add_row(t.key, t.arxiv, t.family, t.cli or "-", t.status, t.title)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the CLI, turning LmlabError into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="lmlab", standalone_mode=False)
    except LmlabError as e:
        click.echo(f"lmlab: error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:  # a bad choice or type, a missing option or path: one line, not click's four
        hint = f" (see `{e.ctx.command_path} -h`)" if e.ctx is not None else ""
        click.echo(f"lmlab: error: {e.format_message()}{hint}", err=True)
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except OSError as e:  # a path that cannot be written or read (a file where a folder goes, no permission, ...)
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"lmlab: error: {e.strerror or e}{where}", err=True)
        return 1
    except click.exceptions.Abort as e:
        cause = e.__cause__ or e.__context__  # click turns KeyboardInterrupt and EOFError alike into Abort
        if isinstance(cause, KeyboardInterrupt):
            click.echo("lmlab: interrupted", err=True)
            return 130
        click.echo(f"lmlab: error: {type(cause).__name__}: {cause}" if cause else "lmlab: aborted", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("lmlab: interrupted (what was written so far is intact; re-run to resume)", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
