"""`perfit` command line: run a federation or the FIT-vs-PerFIT demo, then export, chat with or
join what it trained. A thin layer over the Python API (`perfit.api`).

Every config field is a flag with the same name (`--num-clients 4`); see `perfit fields`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from perfit.config import Config, make_config
from perfit.tuning import LRS

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
        name, equals, value = arg[2:].partition("=")
        if not equals:
            if index + 1 >= len(args):
                raise typer.BadParameter(f"--{name} needs a value")
            value = args[index + 1]
            index += 1
        flags[name.replace("-", "_")] = value
        index += 1
    return flags


def _config(ctx: typer.Context, config_file: Path | None, preset: str | None, **fixed: Any) -> Config:
    try:
        return make_config(config_file, preset, **{**_field_flags(ctx.args), **fixed})
    except ValueError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err


@contextmanager
def _errors(what: str, *more: type[Exception]) -> Iterator[None]:
    """Known input errors (and `more` kinds) become one red line and exit code 2, never a traceback."""
    from perfit.data import DataError
    from perfit.export import RunError

    try:
        yield
    except (DataError, RunError, FileNotFoundError, *more) as err:
        console.print(f"[red]{what} error:[/red] {err}")
        raise typer.Exit(2) from err


def _run(config: Config) -> dict[str, Any]:
    from perfit.api import check_inputs
    from perfit.simulation import run_simulation

    with _errors("data"):  # validate before anything starts, so bad input writes no run output
        check_inputs(config)
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
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run directory from its checkpoint."),
) -> None:
    """Run one federation (FIT or PerFIT) on Flower's simulation engine."""
    if resume is not None:
        if ctx.args or config_file or preset:
            console.print("[red]config error:[/red] --resume takes the run's own config; give no other settings")
            raise typer.Exit(2)
        with _errors("resume"):
            if not (resume / "config.toml").is_file():
                raise FileNotFoundError(f"{resume}: no run to resume (config.toml missing)")
        config = _config(ctx, resume / "config.toml", None, resume=1, out=str(resume))
    else:
        config = _config(ctx, config_file, preset)
    summary = _run(config)
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


RUN_DIR = typer.Argument(..., help="A finished run directory, e.g. runs/demo/perfit.")
BASE_MODEL = typer.Option(None, "--model", help="Where the run's base model is, if not where the run recorded it.")


@app.command()
def export(
    run_dir: Path = RUN_DIR,
    client: int = typer.Option(..., "--client", help="Client id (partition) to export."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base model."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    model: str | None = BASE_MODEL,
) -> None:
    """Export a client's personalized adapter (PEFT) or the base model with it merged in."""
    from perfit.export import export_client

    command = f"perfit export {run_dir} --client {client} --out {out}" + (" --merge" if merge else "")
    with _errors("export"):
        written = export_client(run_dir, client, out, merge=merge, force=force, command=command, model=model)
    console.print(f"{'merged model' if merge else 'adapter'} of client {client} -> {written}")


@app.command()
def chat(
    run_dir: Path = RUN_DIR,
    client: int = typer.Option(..., "--client", help="Client id whose personalized model answers."),
    prompt: str | None = typer.Option(None, "--prompt", help="Answer this one instruction and exit."),
    context: str = typer.Option("", "--context", help="Input/context given with every instruction."),
    compare: bool = typer.Option(False, "--compare", help="Answer with base, global and personalized models."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    model: str | None = BASE_MODEL,
) -> None:
    """Chat with a client's personalized model (Alpaca prompt); Ctrl-C or Ctrl-D ends it."""
    from perfit.chat import generate
    from perfit.export import RunModel

    with _errors("chat"):
        loaded = RunModel(run_dir, model)
        personal = loaded.flat(client)
        shared = loaded.flat(None) if compare else None
    settings = {"context": context, "max_new_tokens": max_new_tokens, "temperature": temperature}

    def answer(instruction: str) -> None:
        if not compare:
            generate(loaded.use(personal), loaded.tokenizer, instruction, on_text=_print_stream, **settings)
            console.print()
            return
        table = Table(title=instruction, show_lines=True)
        answers = []
        with loaded.peft_model.disable_adapter():
            answers.append(generate(loaded.peft_model, loaded.tokenizer, instruction, **settings))
        for flat in (shared, personal):
            answers.append(generate(loaded.use(flat), loaded.tokenizer, instruction, **settings))
        for column in ("base model", "global adapter", f"client {client} (personalized)"):
            table.add_column(column, overflow="fold")
        table.add_row(*answers)
        console.print(table)

    if prompt is not None:
        answer(prompt)
        return
    console.print(f"client {client} of {loaded.run.path} ({loaded.run.config.method}); Ctrl-D or Ctrl-C to leave")
    try:
        while True:
            instruction = console.input("[bold]you>[/bold] ").strip()
            if instruction:
                answer(instruction)
    except (EOFError, KeyboardInterrupt):
        console.print()


def _print_stream(text: str) -> None:
    console.print(text, end="", markup=False, highlight=False, soft_wrap=True)


@app.command()
def join(
    run_dir: Path = RUN_DIR,
    out: Path = typer.Option(..., "--out", help="Output directory for the owner's adapter and join.json."),
    data: Path | None = typer.Option(None, "--data", help="The new owner's .jsonl (instruction data)."),
    holdout_client: int | None = typer.Option(
        None, "--holdout-client", help="Instead of --data: a client the run held out (to measure join)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    model: str | None = BASE_MODEL,
) -> None:
    """Personalize a finished run for a data owner who did not take part in training."""
    from perfit.late_join import join as join_run

    source = f"--data {data}" if data is not None else f"--holdout-client {holdout_client}"
    with _errors("join"):
        report = join_run(
            run_dir,
            out,
            data=data,
            holdout_client=holdout_client,
            model=model,
            force=force,
            command=f"perfit join {run_dir} {source} --out {out}",
        )
    table = Table(title=f"Personalized perplexity of the new owner ({report['eval_rows']} held-out rows)")
    for column in ("base model", "global adapter", "own adapter", "trainable", "wall"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{report['ppl_base']:.3f}",
        f"{report['ppl_global']:.3f}",
        f"{report['ppl_own']:.3f}",
        f"{report['trainable_params']:,}",
        f"{report['seconds']:.0f} s",
    )
    console.print(table)
    console.print(f"adapter and join.json -> {out}")


bench = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench, name="bench")


@bench.command("speed", context_settings=EXTRA)
def bench_speed(
    ctx: typer.Context,
    preset: str = typer.Option("paper", help="Proportions for the search share and bytes (paper: 100 clients)."),
    rows: int | None = typer.Option(None, help="Dolly rows in each timed training pass [default: 48; 512 on a GPU]."),
    out: Path = typer.Option(Path("docs"), help="Directory for performance.md and performance.json."),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="Time bf16 autocast beside fp32 (default: where the CPU has bf16 units)."
    ),
) -> None:
    """Time local training (perfit vs a plain peft loop, fp32 vs bf16, PerFIT vs FIT), MFU, bytes, search share.

    Where the config's device is a GPU (`--device cuda`, or `auto` where torch sees one), local training
    is timed there instead (tokens/s and MFU against the GPU's peak) into performance-cuda.md and .json."""
    import json

    from perfit.model import resolve_device

    config = _config(ctx, None, preset)
    with _errors("config", ValueError):
        device = resolve_device(config.device)
    flags = [f"--preset {preset}", *([] if rows is None else [f"--rows {rows}"])]
    if device.type != "cpu":
        from perfit.speed_device import DeviceBench, device_report_markdown

        with _errors("data"):
            result = DeviceBench(config, **({} if rows is None else {"rows": rows})).run()
        command = " ".join(["perfit bench speed", *ctx.args, *flags])
        text, name = device_report_markdown(result, command), f"performance-{device.type}"
    else:
        from perfit.speed import Bench, with_scale
        from perfit.speed_report import report_markdown

        with _errors("data"):
            result = Bench(config, rows=rows or 48, bf16=bf16).run()
        flags += [] if bf16 is None else ["--bf16" if bf16 else "--no-bf16"]
        command = " ".join(["perfit bench speed", *ctx.args, *flags])
        result = with_scale(result, out / "scale.json")
        text, name = report_markdown(result, command), "performance"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    console.print(text)


SCALE_DEFAULTS = {
    "method": "perfit",
    "num_clients": 100,  # replaced by 100 and 1,000 for the two federations
    "clients_per_round": 10,
    "rounds": 3,
    "max_samples_per_client": 8,
    "eval_clients": 10,
}


@bench.command("scale", context_settings=EXTRA)
def bench_scale(
    ctx: typer.Context,
    out: Path = typer.Option(Path("docs"), help="Directory for scale.md and scale.json."),
    runs: Path = typer.Option(Path("runs/scale"), help="Where the two federations' run directories go."),
) -> None:
    """Round time and memory of whole simulated federations of 100 vs 1,000 clients."""
    import json

    from perfit.flops import cpu_description
    from perfit.scale import bench_scale as measure
    from perfit.scale import scale_markdown

    config = _config(ctx, None, "quick", **{k: v for k, v in SCALE_DEFAULTS.items() if k not in _field_flags(ctx.args)})
    with _errors("data"):
        from perfit.api import check_inputs

        check_inputs(config.replace(num_clients=1000))
        result = measure(config, runs)
    command = " ".join(["perfit bench scale", *ctx.args])
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(
        json.dumps({"command": command, "machine": cpu_description(), **result}, indent=2) + "\n"
    )
    text = scale_markdown(result, command, cpu_description())
    (out / "scale.md").write_text(text)
    console.print(text)


def _grid_selection(ctx: typer.Context, patterns: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """The grid cells matching `--cells` and the extra field flags (only GRID_FREE_FIELDS)."""
    from perfit.experiments import GRID_FREE_FIELDS, grid, select

    common = _field_flags(ctx.args)
    unknown = sorted(set(common) - set(GRID_FREE_FIELDS))
    if unknown:
        console.print(
            f"[red]config error:[/red] the grid fixes every field but {', '.join(GRID_FREE_FIELDS)}: {unknown}"
        )
        raise typer.Exit(2)
    try:
        return select(grid(), patterns), common
    except ValueError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err


def _check_failures(outcomes: list[tuple[Any, int, str]]) -> None:
    """After a grid: name every failed run and exit 1 (the finished ones are kept)."""
    failed = [(cell, seed, what) for cell, seed, what in outcomes if what.startswith("failed")]
    for cell, seed, what in failed:
        console.print(f"[red]{cell.name} seed {seed}: {what}[/red]")
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed[/red]; fix the cause and run the same command again")
        raise typer.Exit(1)


def _list_cells(cells: list[Any], out: Path) -> None:
    from perfit.experiments import state

    table = Table("cell", "seeds", "state", "fields")
    for cell in cells:
        states = ", ".join(f"{seed}: {state(cell, out, seed)}" for seed in cell.seeds)
        table.add_row(cell.name, str(len(cell.seeds)), states, str(cell.fields))
    console.print(table)


@bench.command("paper", context_settings=EXTRA)
def bench_paper(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/paper"), help="Grid directory: one run directory per cell and seed."),
    cells: list[str] = typer.Option([], "--cells", help="Glob(s) of cell names to run, e.g. 'table1/*'."),
    tuned: Path | None = typer.Option(
        None, help="A tuning.json from `perfit bench tune`: run each cell at its chosen learning rate."
    ),
    list_cells: bool = typer.Option(False, "--list", help="List the cells and their state; run nothing."),
) -> None:
    """The paper's experiments at laptop scale (Tables 1-2, baselines, figures, ablations); resumable."""
    from perfit.experiments import run_grid

    chosen, common = _grid_selection(ctx, cells)
    if tuned is not None:
        from perfit.tuning import tuned as with_tuned_lr

        with _errors("tuning", OSError, ValueError):
            chosen = with_tuned_lr(chosen, tuned)
    if list_cells:
        _list_cells(chosen, out)
        return
    with _errors("data"):
        _check_failures(run_grid(chosen, out, common, _run, console.print))
    console.print(f"grid {out}: done; `perfit report --runs {out}` writes docs/results.md")


@bench.command("tune", context_settings=EXTRA)
def bench_tune(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/tune"), help="One run directory per cell and candidate rate."),
    cells: list[str] = typer.Option([], "--cells", help="Glob(s) of grid cells to tune, e.g. 'table1/*'."),
    lrs: str = typer.Option(",".join(f"{lr:g}" for lr in LRS), help="Candidate learning rates."),
    docs: Path = typer.Option(Path("docs"), help="Where tuning.md and tuning.json go."),
    list_cells: bool = typer.Option(False, "--list", help="List the tuning runs and their state; run nothing."),
) -> None:
    """Choose each cell's learning rate on a validation slice of the clients' train splits (seed 0);
    the held-out rows are never read. Resumable; writes docs/tuning.md and docs/tuning.json."""
    import json

    from perfit.experiments import run_grid
    from perfit.outputs import json_safe
    from perfit.tuning import collect, tuning_cells, tuning_markdown

    chosen, common = _grid_selection(ctx, cells)
    try:
        candidates = tuple(float(lr) for lr in lrs.split(","))
    except ValueError as err:
        console.print(f"[red]config error:[/red] --lrs {lrs!r}: {err}")
        raise typer.Exit(2) from err
    runs = tuning_cells(chosen, candidates)
    if list_cells:
        _list_cells(runs, out)
        return
    with _errors("data"):
        _check_failures(run_grid(runs, out, common, _run, console.print))
    with _errors("tuning", ValueError):
        table = collect(chosen, out, candidates)
    command = " ".join(["perfit bench tune", *ctx.args, f"--out {out} --lrs {lrs}", *(f"--cells '{c}'" for c in cells)])
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "tuning.json").write_text(
        json.dumps(json_safe({"command": command, "lrs": list(candidates), "cells": table}), indent=2) + "\n"
    )
    (docs / "tuning.md").write_text(text := tuning_markdown(table, candidates, command))
    console.print(text)


@app.command()
def report(
    runs: Path = typer.Option(Path("runs/paper"), help="The grid directory of `perfit bench paper`."),
    out: Path = typer.Option(Path("docs"), help="Where results.md, results.json and figures/ go."),
    tuned_runs: Path | None = typer.Option(
        None, help="The directory of `perfit bench paper --tuned`: a section comparing its cells at their rates."
    ),
) -> None:
    """Tables, figures and headline ratios from the grid's run directories."""
    from perfit.report import write_report

    with _errors("report"):
        if tuned_runs is not None and not tuned_runs.is_dir():
            raise FileNotFoundError(f"--tuned-runs {tuned_runs}: no such directory")
        written = write_report(runs, out, tuned_runs)
    for path in written:
        console.print(f"wrote {path}")


@app.command()
def fields() -> None:
    """List every config field with its default."""
    table = Table("field", "default")
    for field in dataclasses.fields(Config):
        table.add_row(field.name, repr(field.default))
    console.print(table)


if __name__ == "__main__":
    app()
