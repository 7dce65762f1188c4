"""`perfit run`, `perfit demo`, `perfit config` and `perfit fields`: run federations, see the config."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer
from rich.table import Table

from perfit.cli import base
from perfit.cli.base import EXTRA, PRESET_HELP, app, config_from, console, errors, summary_table
from perfit.config import Config


@app.command(context_settings=EXTRA)
def run(
    ctx: typer.Context,
    config_file: Path | None = typer.Option(None, "--config", help="TOML file with config fields."),
    preset: str | None = typer.Option(None, help=PRESET_HELP),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run directory from its checkpoint."),
) -> None:
    """Run one federation (FIT or PerFIT) on Flower's simulation engine."""
    if resume is not None:
        if ctx.args or config_file or preset:
            console.print("[red]config error:[/red] --resume takes the run's own config; give no other settings")
            raise typer.Exit(2)
        with errors("resume"):
            if not (resume / "config.toml").is_file():
                raise FileNotFoundError(f"{resume}: no run to resume (config.toml missing)")
        config = config_from(ctx, resume / "config.toml", None, resume=1, out=str(resume))
    else:
        config = config_from(ctx, config_file, preset)
    summary = base.run_federation(config)
    console.print(summary_table([summary]))


@app.command(context_settings=EXTRA)
def demo(
    ctx: typer.Context,
    config_file: Path | None = typer.Option(None, "--config", help="TOML file with config fields."),
    preset: str = typer.Option("quick", help="Preset for both runs."),
    out: str = typer.Option("runs/demo", help="Parent directory of the two run directories."),
) -> None:
    """FIT and PerFIT on the same split, side by side."""
    started = time.perf_counter()
    summaries = []
    for method in ("fit", "perfit"):
        config = config_from(ctx, config_file, preset, method=method, out=str(Path(out) / method))
        summaries.append(base.run_federation(config))
    console.print(summary_table(summaries))
    fit, perfit = summaries
    console.print(
        f"PerFIT / FIT personalized perplexity: {perfit['personalized_ppl'] / fit['personalized_ppl']:.3f}  "
        f"(demo wall time {time.perf_counter() - started:.0f} s)"
    )


@app.command(context_settings=EXTRA)
def config(
    ctx: typer.Context,
    config_file: Path | None = typer.Option(None, "--config", help="TOML file with config fields."),
    preset: str | None = typer.Option(None, help=PRESET_HELP),
    flwr: bool = typer.Option(False, "--flwr", help="Print as a `flwr run --run-config` string."),
) -> None:
    """Print the resolved config (TOML, or run-config overrides for `flwr run .`)."""
    resolved = config_from(ctx, config_file, preset)
    if not flwr:
        typer.echo(resolved.to_toml(), nl=False)
        return
    # `flwr run` executes a copy of the app under $FLWR_HOME/apps: local paths must be absolute.
    values = resolved.to_dict()
    values["out"] = str(Path(resolved.out).expanduser().resolve())
    for key in ("data", "model", "cache_dir", "start_from", "masks_from"):
        if values[key] and Path(values[key]).expanduser().exists():
            values[key] = str(Path(values[key]).expanduser().resolve())
    pairs = [f'{k}="{v}"' if isinstance(v, str) else f"{k}={v!r}" for k, v in values.items()]
    typer.echo(" ".join(pairs))


@app.command()
def fields() -> None:
    """List every config field with its default."""
    table = Table("field", "default")
    for field in dataclasses.fields(Config):
        table.add_row(field.name, repr(field.default))
    console.print(table)
