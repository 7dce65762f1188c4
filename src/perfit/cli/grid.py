"""`perfit bench paper / tune` and `perfit report`: the paper's grid and the personalization grid,
their tuning (in lanes where asked, `bench.lanes`), and the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from perfit.bench.tuning import LRS
from perfit.cli import base
from perfit.cli.base import EXTRA, app, console, errors, field_flags
from perfit.cli.bench import bench

GRID_HELP = (
    "paper: the paper's experiments at the quick scale; personal: does personalization pay, at the paper's data "
    "per client (the medium preset; held-out seeds 1-3, tuned at seed 0)."
)


def _grid_selection(ctx: typer.Context, patterns: list[str], name: str) -> tuple[list[Any], dict[str, Any]]:
    """The cells of grid `name` matching `--cells` and the extra field flags (only GRID_FREE_FIELDS)."""
    from perfit.bench.experiments import GRID_FREE_FIELDS, GRIDS, select

    common = field_flags(ctx.args)
    unknown = sorted(set(common) - set(GRID_FREE_FIELDS))
    if unknown:
        console.print(
            f"[red]config error:[/red] the grid fixes every field but {', '.join(GRID_FREE_FIELDS)}: {unknown}"
        )
        raise typer.Exit(2)
    if name not in GRIDS:
        console.print(f"[red]config error:[/red] --grid {name!r}: one of {', '.join(GRIDS)}")
        raise typer.Exit(2)
    try:
        return select(GRIDS[name](), patterns), common
    except ValueError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err


RECORD_HELP = (
    "A directory committed with the project that keeps each finished run's small files (bench.record): "
    "runs it holds are put back into OUT instead of run again on a fresh machine."
)


def _start_rates(cells: list[Any], out: Path, tuning: dict[str, Any], grid: str) -> dict[str, float]:
    """The rate each start cell's tuning chose: a cell that starts from another cell's run (`Cell.start`)
    starts from that cell's tuning run at that rate, so it can run only once that tuning has chosen."""
    from perfit.bench.experiments import GRIDS
    from perfit.bench.tuning import collect

    every = {c.name: c for c in GRIDS[grid]()}
    starts = sorted({c.start for c in cells if c.start})
    with errors("tuning", ValueError):
        table = collect([every[name] for name in starts], out, **tuning)
    return {name: entry["chosen_lr"] for name, entry in table.items() if "chosen_lr" in entry}


def _tuning_runs(cells: list[Any], out: Path, tuning: dict[str, Any], grid: str) -> list[Any]:
    """The tuning runs `cells` need now: each candidate, widened past an end where the finished runs
    ask for it (`bench.tuning.candidates`); a cell with a start cell only once its rate is chosen.
    `tuning`: `collect`'s lrs, widen and transcribed values."""
    from perfit.bench.tuning import collect, tuning_cells

    with errors("tuning", ValueError):
        widened = {name: tuple(entry["lrs"]) for name, entry in collect(cells, out, **tuning).items()}
    return tuning_cells(cells, tuning["lrs"], _start_rates(cells, out, tuning, grid), widened)


def _restore(runs: Callable[[], list[Any]], out: Path, record: Path | None, keep: bool = True) -> None:
    """Put back the finished runs `record` holds (`bench.record.restore`) until no more come back (a
    restored run can add runs: FIT's choice adds FIT + FT's tuning runs), then, where `keep`, keep
    what OUT has (not for --list, which writes nothing to the record)."""
    from perfit.bench.experiments import schedule
    from perfit.bench.record import keep_all, restore

    if record is None:
        return
    while True:
        restored, again = restore(schedule(runs()), out, record)
        for directory in again:
            console.print(f"{directory}: recorded, but a run still to go needs its files: runs again")
        if not restored:
            break
        console.print(f"{len(restored)} finished run(s) put back from {record}")
    if keep:
        keep_all(out, record)


def _check_failures(outcomes: list[tuple[Any, int, str]]) -> None:
    """After a grid: name every failed run and exit 1 (the finished ones are kept)."""
    failed = [(cell, seed, what) for cell, seed, what in outcomes if what.startswith("failed")]
    for cell, seed, what in failed:
        console.print(f"[red]{cell.name} seed {seed}: {what}[/red]")
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed[/red]; fix the cause and run the same command again")
        raise typer.Exit(1)


LANES_HELP = (
    "Run the cells N at a time, each lane a process on its own share of the cores (every GPU it sees), "
    "a cell with the cells it builds on, all its seeds (bench.lanes; logs in OUT/lanes/); 1: in this process."
)


def _in_lanes(
    lanes: int,
    cells: list[Any],
    out: Path,
    command: list[str],
    unfinished: set[str],
    lane_args: Callable[[int], list[str]] | None = None,
) -> None:
    """Run `perfit <command> --cells ...` in `lanes` lanes (`bench.lanes`) for each unit of `cells`
    with a cell in `unfinished`; exit 1 naming each unit that failed, 130 when stopped.
    `lane_args(k)`: extra arguments for lane k's processes."""
    import sys

    from perfit.bench.lanes import lane_cores, run_lanes, units
    from perfit.federation.simulation import CLIENT_CPUS, usable_cores

    try:
        cores = lane_cores(lanes, usable_cores())
    except ValueError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err

    def lane_command(unit: list[str], k: int) -> list[str]:
        selected = [arg for name in unit for arg in ("--cells", name)]
        return [sys.executable, "-m", "perfit", *command, *(lane_args(k) if lane_args else []), *selected]

    try:
        work = [unit for unit in units(cells) if unfinished.intersection(unit)]  # a resumed grid: the rest
        ended = run_lanes(work, lane_command, cores, CLIENT_CPUS, out / "lanes", console.print)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    failed = [unit for unit, status in ended if status != 0]
    for unit in failed:
        console.print(f"[red]failed: {', '.join(unit)}[/red] (its lane's log in {out / 'lanes'})")
    if failed:
        console.print(f"[red]{len(failed)} unit(s) failed[/red]; fix the cause and run the same command again")
        raise typer.Exit(1)


def _list_cells(cells: list[Any], out: Path, lanes: int = 1) -> None:
    """The table of `cells`' runs and their state, and the hours spent and to go: lane time, and with
    `lanes` > 1 about that over the lanes in wall time (lanes take whole cells, so a little more)."""
    from perfit.bench.experiments import progress, state

    table = Table("cell", "seeds", "state", "fields", "builds on (same seed)")
    for cell in cells:
        states = ", ".join(f"{seed}: {state(cell, out, seed)}" for seed in cell.seeds)
        sources = ", ".join(f"{field}: {name}" for field, name in cell.sources.items())
        table.add_row(cell.name, str(len(cell.seeds)), states, str(cell.fields), sources)
    console.print(table)
    done, runs, spent, left = progress(cells, out)
    pace = "none finished to estimate the rest from" if left is None else f"about {left / 3600:.1f} h to go"
    if left is not None and lanes > 1:
        pace += f" (about {left / 3600 / lanes:.1f} h of wall time in {lanes} lanes)"
    console.print(f"{done} of {runs} runs finished, {spent / 3600:.1f} h of wall time; {pace}")
    if left is not None:
        console.print("(a run to go: the mean wall time of finished runs of its kind; a resumable one counts whole)")


@bench.command("paper", context_settings=EXTRA)
def bench_paper(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/paper"), help="Grid directory: one run directory per cell and seed."),
    cells: list[str] = typer.Option([], "--cells", help="Glob(s) of cell names to run, e.g. 'table1/*'."),
    tuned: Path | None = typer.Option(
        None, help="A tuning.json from `perfit bench tune`: run each cell at its chosen learning rate."
    ),
    list_cells: bool = typer.Option(False, "--list", help="List the cells and their state; run nothing."),
    grid: str = typer.Option("paper", help=GRID_HELP),
    lanes: int = typer.Option(1, min=1, help=LANES_HELP),
    record: Path | None = typer.Option(None, help=RECORD_HELP),
) -> None:
    """The paper's experiments at laptop scale (Tables 1-2, baselines, figures, ablations); resumable."""
    from perfit.bench.experiments import run_grid

    chosen, common = _grid_selection(ctx, cells, grid)
    if tuned is not None:
        from perfit.bench.tuning import tuned as with_tuned_lr

        with errors("tuning", OSError, ValueError):
            chosen = with_tuned_lr(chosen, tuned)
    with errors("record", OSError, ValueError):  # before --list too: it lists what is left to run
        _restore(lambda: chosen, out, record, keep=not list_cells)
    if list_cells:
        _list_cells(chosen, out, lanes)
        return
    if lanes > 1:
        from perfit.bench.experiments import state

        tuning = ["--tuned", str(tuned)] if tuned is not None else []
        kept = ["--record", str(record)] if record is not None else []
        command = ["bench", "paper", "--out", str(out), "--grid", grid, *tuning, *kept, *ctx.args]
        unfinished = {cell.name for cell in chosen if any(state(cell, out, seed) != "done" for seed in cell.seeds)}
        _in_lanes(lanes, chosen, out, command, unfinished)
    with errors("data"):  # after lanes: every run is finished, and this pass says so
        _check_failures(run_grid(chosen, out, common, base.run_federation, console.print, record))
    console.print(f"grid {out}: done; `perfit report --runs {out}` writes docs/results.md")


def _with_sources(chosen: list[Any], grid: str) -> list[Any]:
    """The chosen cells and every cell their runs build on (FIT for FIT + FT, ...), in the grid's
    order: a source before its user. A cell's tuning runs may need its sources' chosen rates."""
    from perfit.bench.experiments import GRIDS

    every = {c.name: c for c in GRIDS[grid]()}
    selected = {c.name for c in chosen}
    needs = set(selected)
    while more := {n for name in needs for n in every[name].sources.values()} - needs:
        needs |= more
    with_sources = [*chosen, *(c for c in every.values() if c.name in needs - selected)]
    return sorted(with_sources, key=lambda c: list(every).index(c.name))


def _write_tuning(docs: Path, document: dict[str, Any], transcribed_source: str) -> str:
    """tuning.json (`document`, with where its transcribed rates come from) and tuning.md in `docs`;
    returns tuning.md's text."""
    import json

    from perfit.bench.tuning import tuning_markdown
    from perfit.federation.run_directory import json_safe

    docs.mkdir(parents=True, exist_ok=True)
    if transcribed_source:
        document = {**document, "transcribed_source": transcribed_source}
    (docs / "tuning.json").write_text(json.dumps(json_safe(document), indent=2) + "\n")
    text = tuning_markdown(document["cells"], tuple(document["lrs"]), document["command"], transcribed_source)
    (docs / "tuning.md").write_text(text)
    return text


def _parse_lrs(lrs: str) -> tuple[float, ...]:
    """`--lrs` as rates; a value that is not a number is a config error naming it."""
    try:
        return tuple(float(lr) for lr in lrs.split(","))
    except ValueError as err:
        console.print(f"[red]config error:[/red] --lrs {lrs!r}: {err}")
        raise typer.Exit(2) from err


def _tune_in_lanes(lanes: int, chosen: list[Any], runs: list[Any], out: Path, tune: list[str]) -> None:
    """The unfinished tuning runs of the `chosen` cells in `lanes` processes (`bench tune` args `tune`),
    each writing its part's tables to OUT/lanes/docsK; the caller writes the whole table after."""
    from perfit.bench.experiments import state

    unfinished = {run.name.rsplit("/", 1)[0] for run in runs if state(run, out, 0) != "done"}
    _in_lanes(lanes, chosen, out, tune, unfinished, lambda k: ["--docs", str(out / "lanes" / f"docs{k}")])


@bench.command("tune", context_settings=EXTRA)
def bench_tune(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/tune"), help="One run directory per cell and candidate rate."),
    cells: list[str] = typer.Option([], "--cells", help="Glob(s) of grid cells to tune, e.g. 'table1/*'."),
    lrs: str = typer.Option(",".join(f"{lr:g}" for lr in LRS), help="Candidate learning rates."),
    docs: Path = typer.Option(Path("docs"), help="Where tuning.md and tuning.json go."),
    list_cells: bool = typer.Option(False, "--list", help="List the tuning runs and their state; run nothing."),
    grid: str = typer.Option("paper", help=GRID_HELP),
    widen: int = typer.Option(
        0, min=0, help="A choice at an end of --lrs also runs the rate half a decade past it, up to N times a cell."
    ),
    lanes: int = typer.Option(1, min=1, help=LANES_HELP),
    record: Path | None = typer.Option(None, help=RECORD_HELP),
    transcribed: Path | None = typer.Option(
        None,
        help="A JSON file of validation perplexities whose runs are gone ({'source': ..., 'cells': {cell: {rate: "
        "ppl}}}): those rates count without running again, unless a run still to go builds on them; marked †.",
    ),
) -> None:
    """Choose each cell's learning rate on a validation slice of the clients' train splits (seed 0);
    the held-out rows are never read. Resumable; writes docs/tuning.md and docs/tuning.json."""
    from perfit.bench.tuning import collect, read_transcribed, still_to_run

    chosen, common = _grid_selection(ctx, cells, grid)
    candidates = _parse_lrs(lrs)
    source, copied = "", {}
    if transcribed is not None:
        with errors("transcribed", OSError, ValueError):
            source, copied = read_transcribed(transcribed)
    tuning = {"lrs": candidates, "widen": widen, "transcribed": copied}
    given = {flag: path for flag, path in (("record", record), ("transcribed", transcribed)) if path is not None}

    selected = {c.name for c in chosen}
    with_sources = _with_sources(chosen, grid)

    def to_run() -> list[Any]:
        return still_to_run(_tuning_runs(with_sources, out, tuning, grid), copied, out, selected)

    with errors("record", OSError, ValueError):  # before --list too: it lists what is left to run
        _restore(to_run, out, record, keep=not list_cells)
    if list_cells:
        _list_cells(to_run(), out, lanes)
        return
    runs = to_run()
    if lanes > 1:  # each lane writes its part's tables aside; this process then writes the whole
        tune = ["bench", "tune", "--out", str(out), "--grid", grid, "--lrs", lrs, "--widen", str(widen), *ctx.args]
        tune += [arg for flag, path in given.items() for arg in (f"--{flag}", str(path))]
        _tune_in_lanes(lanes, chosen, runs, out, tune)
        runs = to_run()
    outcomes = _run_until_settled(runs, to_run, out, common, record)
    with errors("tuning", ValueError):
        table = collect(chosen, out, **tuning)
    rates = _start_rates(chosen, out, tuning, grid)
    for cell in chosen:
        if cell.start and cell.start not in rates:
            console.print(f"{cell.name}: waits for the tuning of {cell.start}, the run it starts from")
    _check_failures(outcomes)
    widening = f" --widen {widen}" if widen else ""
    flags = [*ctx.args, f"--out {out} --lrs {lrs}{widening}", *(f"--{flag} {path}" for flag, path in given.items())]
    command = " ".join(["perfit bench tune", *flags, *(f"--cells '{c}'" for c in cells)])
    document = {"command": command, "out": str(out.resolve()), "lrs": list(candidates), "widen": widen, "cells": table}
    console.print(_write_tuning(docs, document, source))


def _run_until_settled(runs: list[Any], to_run: Any, out: Path, common: dict, record: Path | None) -> list[Any]:
    """Run `runs`, then what the finished runs asked for (FIT + FT once FIT has chosen its rate, a
    widened rate), until `to_run()` names nothing not tried yet. Returns every run's outcome."""
    from perfit.bench.experiments import run_grid

    outcomes: list[tuple[Any, int, str]] = []
    while runs:
        with errors("data"):
            outcomes += run_grid(runs, out, common, base.run_federation, console.print, record)
        tried = {cell.name for cell, _, _ in outcomes}
        runs = [run for run in to_run() if run.name not in tried]
    return outcomes


@app.command()
def report(
    runs: Path = typer.Option(Path("runs/paper"), help="The grid directory of `perfit bench paper`."),
    out: Path = typer.Option(Path("docs"), help="Where results.md, results.json and figures/ go."),
    tuned_runs: Path | None = typer.Option(
        None, help="The directory of `perfit bench paper --tuned`: a section comparing its cells at their rates."
    ),
    personal_runs: Path | None = typer.Option(
        None, help="The directory of `perfit bench paper --grid personal`: the personalization section."
    ),
    personal_tuning: Path | None = typer.Option(
        None, help="The tuning.json of `perfit bench tune --grid personal` (it chooses the PerFIT variant)."
    ),
) -> None:
    """Tables, figures and headline ratios from the grid's run directories (with only
    `--personal-runs` at hand: its section spliced into `out`'s results.md and .json, the rest kept;
    in personalization.md and .json where `out` has no report)."""
    from perfit.bench.report import write_report

    with errors("report", OSError, ValueError, KeyError):
        for flag, path in (("--tuned-runs", tuned_runs), ("--personal-runs", personal_runs)):
            if path is not None and not path.is_dir():
                raise FileNotFoundError(f"{flag} {path}: no such directory")
        if personal_runs is not None and not runs.is_dir():  # the personalization grid alone
            from perfit.bench.personal_report import write

            written = write(personal_runs, personal_tuning, out)
        else:
            written = write_report(runs, out, tuned_runs, personal_runs, personal_tuning)
    for path in written:
        console.print(f"wrote {path}")
