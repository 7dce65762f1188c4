"""What every `perfit` command shares: the typer app, the console, config fields as flags, input
errors as one red line (exit code 2), and running one federation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from perfit.config import Config, make_config

HELP = """`perfit` command line: run a federation or the FIT-vs-PerFIT demo, then export, chat with or
join what it trained; benchmarks and the paper's experiments under `perfit bench`. A thin layer
over the Python API (`perfit.api`).

Every config field is a flag with the same name (`--num-clients 4`); see `perfit fields`.
"""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for the summary table
    console = Console(width=140)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
PRESET_HELP = (
    "quick (minutes on 2 CPU cores), medium (the paper's data per client: 10 clients, 10 rounds) or "
    "paper (the paper's setting)."
)


def field_flags(args: list[str]) -> dict[str, str]:
    """`--num-clients 4 --method=fit` -> {"num_clients": "4", "method": "fit"}."""
    flags, index = {}, 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--"):
            raise typer.BadParameter(f"unexpected argument {arg!r}; fields are given as --name value")
        name, equals, value = arg[2:].partition("=")
        if not equals:
            if index + 1 >= len(args):
                raise typer.BadParameter(f"--{name} needs a value")
            value = args[index + 1]
            index += 1
        flags[name.replace("-", "_")] = value
        index += 1
    return flags


def config_from(ctx: typer.Context, config_file: Path | None, preset: str | None, **fixed: Any) -> Config:
    try:
        return make_config(config_file, preset, **{**field_flags(ctx.args), **fixed})
    except ValueError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err


@contextmanager
def errors(what: str, *more: type[Exception]) -> Iterator[None]:
    """Known input errors (and `more` kinds) become one red line and exit code 2, never a traceback."""
    from perfit.client.data import DataError
    from perfit.federation.roster import NodesFailed
    from perfit.use.export import RunError

    try:
        yield
    except (DataError, RunError, NodesFailed, FileNotFoundError, *more) as err:
        console.print(f"[red]{what} error:[/red] {err}")
        raise typer.Exit(2) from err


def run_federation(config: Config) -> dict[str, Any]:
    from perfit.api import check_inputs
    from perfit.federation.simulation import run_simulation

    with errors("data"):  # validate before anything starts, so bad input writes no run output
        check_inputs(config)
    console.print(f"[bold]{config.method}[/bold] on {config.data} -> {config.out}")
    with errors("data"):  # a client's bad file, found on its node: named, and nothing written
        return run_simulation(config)


def _shown_path(path: str) -> str:
    """A run directory as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


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
            _shown_path(s["out"]),
        )
    table.caption = "\n".join(filter(None, map(_weaker_than_configured, summaries))) or None
    return table


def _weaker_than_configured(summary: dict[str, Any]) -> str:
    """A line naming what made the run weaker than its config says (the log and summary.json have
    each case), or "" for a run without any."""
    rejected, lost = summary.get("rejected_updates") or [], summary.get("kept_lost") or []
    parts = [f"{len(rejected)} client update(s) rejected"] if rejected else []
    parts += [f"{len(lost)} time(s) a node lost the values it kept and started them afresh"] if lost else []
    if not parts:
        return ""
    return f"{summary['method']}: {', '.join(parts)} (summary.json: rejected_updates, kept_lost)"
