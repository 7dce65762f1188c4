"""`perfit` command line: run one federation, run the FIT-vs-PerFIT demo, print a resolved config.

Every config field is a flag with the same name (`--num-clients 4`); see `perfit fields`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from perfit.config import Config, from_mapping, from_toml

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for the summary table
    console = Console(width=140)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _field_flags(args: list[str]) -> dict[str, str]:
    """`--num-clients 4 --method=fit` -> {"num_clients": "4", "method": "fit"}."""
    flags, index = {}, 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--"):
            raise typer.BadParameter(f"unexpected argument {arg!r}; fields are given as --name value")
        name, _, value = arg[2:].partition("=")
        if not value:
            if index + 1 >= len(args):
                raise typer.BadParameter(f"--{name} needs a value")
            value = args[index + 1]
            index += 1
        flags[name.replace("-", "_")] = value
        index += 1
    return flags


def _config(ctx: typer.Context, config_file: Path | None, preset: str | None, **fixed: Any) -> Config:
    overrides = {**_field_flags(ctx.args), **fixed}
    try:
        if config_file is not None:
            return from_toml(config_file, preset=preset, **overrides)
        return from_mapping(overrides, preset=preset)
    except ValueError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err


def _check_inputs(config: Config) -> None:
    """Validate data and split before anything starts, so bad input writes no run output."""
    from perfit.data import DataError, load_rows, partition

    try:
        partition(load_rows(config.data), config)
    except (DataError, FileNotFoundError) as err:
        console.print(f"[red]data error:[/red] {err}")
        raise typer.Exit(2) from err


def _run(config: Config) -> dict[str, Any]:
    from perfit.simulation import run_simulation

    _check_inputs(config)
    console.print(f"[bold]{config.method}[/bold] on {config.data} -> {config.out}")
    return run_simulation(config)


def summary_table(summaries: list[dict[str, Any]]) -> Table:
    table = Table(title="Personalized perplexity (mean over clients; lower is better)")
    for column in ("method", "pers. ppl", "overall ppl", "trainable/client", "MB up", "MB down", "wall", "outputs"):
        table.add_column(column, justify="left" if column in ("method", "outputs") else "right", no_wrap=True)
    for s in summaries:
        params = sorted(set(s["trainable_params_per_client"].values()))
        params_text = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}-{params[-1]:,}"
        table.add_row(
            s["method"],
            f"{s['personalized_ppl']:.3f}",
            f"{s['overall_ppl']:.3f}",
            params_text,
            f"{s['bytes_up_total'] / 1e6:.2f}",
            f"{s['bytes_down_total'] / 1e6:.2f}",
            f"{s['wall_seconds']:.0f} s",
            s["out"],
        )
    return table


@app.command(context_settings=EXTRA)
def run(
    ctx: typer.Context,
    config_file: Path | None = typer.Option(None, "--config", help="TOML file with config fields."),
    preset: str | None = typer.Option(None, help="quick (minutes on 2 CPU cores) or paper (the paper's setting)."),
) -> None:
    """Run one federation (FIT or PerFIT) on Flower's simulation engine."""
    summary = _run(_config(ctx, config_file, preset))
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
        config = _config(ctx, config_file, preset, method=method, out=str(Path(out) / method))
        summaries.append(_run(config))
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
    preset: str | None = typer.Option(None, help="quick or paper."),
    flwr: bool = typer.Option(False, "--flwr", help="Print as a `flwr run --run-config` string."),
) -> None:
    """Print the resolved config (TOML, or run-config overrides for `flwr run .`)."""
    resolved = _config(ctx, config_file, preset)
    if not flwr:
        typer.echo(resolved.to_toml(), nl=False)
        return
    # `flwr run` executes a copy of the app under $FLWR_HOME/apps: local paths must be absolute.
    values = resolved.to_dict()
    values["out"] = str(Path(resolved.out).expanduser().resolve())
    for key in ("data", "model", "cache_dir"):
        if values[key] and Path(values[key]).expanduser().exists():
            values[key] = str(Path(values[key]).expanduser().resolve())
    pairs = [f'{k}="{v}"' if isinstance(v, str) else f"{k}={v!r}" for k, v in values.items()]
    typer.echo(" ".join(pairs))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory, e.g. runs/demo/perfit."),
    client: int = typer.Option(..., "--client", help="Client id (partition) to export."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base model."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
) -> None:
    """Export a client's personalized adapter (PEFT) or the base model with it merged in."""
    from perfit.export import RunError, export_client

    command = f"perfit export {run_dir} --client {client} --out {out}" + (" --merge" if merge else "")
    try:
        written = export_client(run_dir, client, out, merge=merge, force=force, command=command)
    except RunError as err:
        console.print(f"[red]export error:[/red] {err}")
        raise typer.Exit(2) from err
    console.print(f"{'merged model' if merge else 'adapter'} of client {client} -> {written}")


@app.command()
def fields() -> None:
    """List every config field with its default."""
    table = Table("field", "default")
    for field in dataclasses.fields(Config):
        table.add_row(field.name, repr(field.default))
    console.print(table)


if __name__ == "__main__":
    app()
