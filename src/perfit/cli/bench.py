"""`perfit bench speed / scale / masks / cross / base`: speed and scale benchmarks, and the readings of the masks and
models a grid's runs make (`cli.grid` adds `bench paper / tune` and `report`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from perfit.cli.base import EXTRA, app, config_from, console, errors, field_flags

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

    from perfit.client.model import resolve_device

    config = config_from(ctx, None, preset)
    with errors("config", ValueError):
        device = resolve_device(config.device)
    flags = [f"--preset {preset}", *([] if rows is None else [f"--rows {rows}"])]
    if device.type != "cpu":
        from perfit.bench.speed_device import DeviceBench, device_report_markdown

        with errors("data"):
            result = DeviceBench(config, **({} if rows is None else {"rows": rows})).run()
        command = " ".join(["perfit bench speed", *ctx.args, *flags])
        text, name = device_report_markdown(result, command), f"performance-{device.type}"
    else:
        from perfit.bench.speed import Bench, with_scale
        from perfit.bench.speed_report import report_markdown

        with errors("data"):
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

    from perfit.bench.scale import bench_scale as measure
    from perfit.bench.scale import scale_markdown
    from perfit.client.hardware import cpu_description

    config = config_from(
        ctx, None, "quick", **{k: v for k, v in SCALE_DEFAULTS.items() if k not in field_flags(ctx.args)}
    )
    with errors("data"):
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


@bench.command("masks", context_settings=EXTRA)
def bench_masks(
    ctx: typer.Context,
    preset: str = typer.Option("quick", help="The preset under the config flags."),
    vary: list[str] = typer.Option(
        [], "--vary", help="FIELD=V1,V2: search under each value (several --vary: every combination)."
    ),
    out: Path | None = typer.Option(None, help="Also write the readings to this .json file."),
) -> None:
    """Do the masks follow the data? Runs only the clients' searches (no federation) under each variant.

    Prints, per variant, the clients' mean pairwise mask overlap, the overlap with the data-free mask
    (top-k of |theta_0|), the correlation of mask overlap with category overlap over client pairs and
    its permutation p-value, and the share of a client's kept positions no other client keeps."""
    import itertools
    import json

    from perfit.bench.diagnostics import search_diagnostics

    base_config = config_from(ctx, None, preset, method="perfit")
    axes = []
    for item in vary:
        name, equals, values = item.partition("=")
        if not equals or not values:
            raise typer.BadParameter(f"--vary {item!r}: expected FIELD=V1,V2")
        axes.append([(name.replace("-", "_"), value) for value in values.split(",")])
    columns = ("pairwise overlap", "with data-free mask", "r (mask vs data)", "r's p", "kept alone", "search s")
    table = Table("variant", *columns)
    readings = []
    for combination in itertools.product(*axes):
        label = " ".join(f"{k}={v}" for k, v in combination) or "as configured"
        config = config_from(ctx, None, preset, method="perfit", **dict(combination))
        with errors("data", ValueError):
            reading = {"variant": label, **search_diagnostics(config)}
        readings.append(reading)
        overlaps = [f"{reading[k]:.3f}" for k in ("mean_pairwise_overlap", "overlap_with_data_free_mask")]
        r, p = reading["mask_vs_data_similarity_r"], reading["mask_vs_data_similarity_p"]
        seconds = reading["search_seconds"]
        table.add_row(label, *overlaps, f"{r:.2f}", f"{p:.4f}", f"{reading['kept_alone']:.3f}", f"{seconds:.0f}")
    console.print(table)
    if out is not None:
        command = " ".join(["perfit bench masks", f"--preset {preset}", *(f"--vary {v}" for v in vary), *ctx.args])
        document = {"command": command, "config": base_config.to_dict(), "readings": readings}
        out.write_text(json.dumps(document, indent=2) + "\n")


@bench.command("cross")
def bench_cross(
    run: Path = typer.Argument(..., help="A finished run directory (a research split)."),
    clients: str = typer.Option("", help="Comma-separated client ids to read (default: all of the run's)."),
    out: Path | None = typer.Option(None, help="Where the readings go (default RUN/cross.json: the report reads it)."),
) -> None:
    """Does each client's own model fit its data better than the other clients' models do? Scores every
    client's final model, and the global one, on every client's held-out rows (the rows the run scored)."""
    from perfit.bench.diagnostics import cross_evaluation, write_reading

    try:
        chosen = [int(c) for c in clients.split(",")] if clients else None
    except ValueError as err:
        raise typer.BadParameter(f"--clients {clients!r}: expected ids like 0,3,5") from err
    with errors("run", ValueError):
        reading = cross_evaluation(run, chosen)
    table = Table("client", "own model", "others' (geo. mean)", "own / others", "global", "own / global")
    for k, client in enumerate(reading["clients"]):
        own, ratio = reading["ppl"][k][k], reading["own_over_others"][k]
        table.add_row(
            str(client), f"{own:.3f}", f"{own / ratio:.3f}", f"{ratio:.4f}",
            f"{reading['global_ppl'][k]:.3f}", f"{reading['own_over_global'][k]:.4f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"own / others, geometric mean: {reading['mean_own_over_others']:.4f} (1: no client's model is its own); "
        f"the diagonal reproduces the run's per-client perplexities to {reading['diagonal_max_rel_diff']:.1e}"
    )
    write_reading(out or run / "cross.json", reading)


@bench.command("base")
def bench_base(
    run: Path = typer.Argument(..., help="A finished run directory (a research split; a record's copy will do)."),
    out: Path | None = typer.Option(None, help="Where the reading goes (default RUN/base.json: the report reads it)."),
) -> None:
    """How far did training move each client from the base model? Scores the base model, with no
    adapter, on every client's rows the run scored, beside the run's own perplexity of each."""
    from perfit.bench.diagnostics import base_evaluation, write_reading

    with errors("run", ValueError):
        reading = base_evaluation(run)
    table = Table("client", "base model", f"run ({reading['method']})", "run / base")
    for client, base, own in zip(reading["clients"], reading["base_ppl"], reading["run_ppl"], strict=True):
        table.add_row(str(client), f"{base:.3f}", f"{own:.3f}", f"{own / base:.4f}")
    console.print(table)
    console.print(
        f"personalized perplexity: base model {reading['personalized_base_ppl']:.3f}, the run "
        f"{reading['run_over_base']:.4f}x it ({reading['seconds']:.0f} s)"
    )
    write_reading(out or run / "base.json", reading)
