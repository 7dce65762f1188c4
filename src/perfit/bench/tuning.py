"""`perfit bench tune`: the learning rate of each grid cell chosen on a validation slice.

The procedure is the same for every method, so no method is tuned harder than another:
- each candidate learning rate runs the cell's exact setting at seed 0 with `validation = 1`: every
  client's train split is split again 80/20 (seeded), the run trains on the 80 % and reports the
  personalized perplexity on the 20 % validation slice. The held-out rows that every reported
  result is measured on are never read while tuning;
- the candidate with the lowest validation perplexity is chosen (a tie goes to the smaller rate);
- with `widen` > 0, a choice at an end of the candidates is not trusted: the next rate half a decade
  past that end runs too, and so on until the choice is inside, at most `widen` times per cell (a
  best rate at the edge says only that the optimum may lie beyond it);
- `perfit bench paper --tuned docs/tuning.json` then runs the cells at their chosen rates.
Runs are resumable grid runs (`<out>/<cell>/lr<rate>/seed0`), so tuning can also span sittings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from perfit.bench.experiments import Cell

LRS = (3e-4, 1e-3, 3e-3)
"""Candidates: the paper's 3e-4 and two steps of about 3x up (at the grid's scale a client takes
only a handful of optimizer steps, so the question is whether a larger step pays)."""


def lr_label(lr: float) -> str:
    return f"lr{lr:g}"


def tuning_cells(
    cells: list[Cell],
    lrs: tuple[float, ...] = LRS,
    start_rates: Mapping[str, float] | None = None,
    widened: Mapping[str, tuple[float, ...]] | None = None,
) -> list[Cell]:
    """One validation-mode cell per (cell, candidate rate), seed 0 only; they choose by validation
    perplexity, so they generate no answers for ROUGE-L. A cell that starts from another cell's run
    (`Cell.start`, e.g. FIT + local fine-tuning from FIT's) starts from that cell's tuning run at the
    rate its tuning chose (`start_rates`: cell name -> chosen rate); until it has chosen, the cell
    has no tuning runs. A PerFIT cell searches its masks once (`masks_run`). `widened`: cell name ->
    its candidates where `candidates` has added rates past an end of `lrs` (`collect`'s "lrs")."""
    tuning = {"validation": 1, "rouge_samples": 0}
    runs = []
    for cell in cells:
        start = cell.start
        if start:
            if start not in (start_rates or {}):
                continue
            start = f"{start}/{lr_label(start_rates[start])}"
        extra = [lr for lr in (widened or {}).get(cell.name, ()) if lr not in lrs]
        for lr in (*lrs, *extra):  # the given order first: a PerFIT cell's first rate searches the masks
            fields = {**cell.fields, "lr": lr, **tuning}
            masks = masks_run(cell, lr, lrs)
            runs.append(replace(cell, name=tuning_name(cell, lr), fields=fields, seeds=(0,), start=start, masks=masks))
    return runs


def masks_run(cell: Cell, lr: float, lrs: tuple[float, ...]) -> str:
    """The tuning run whose masks `cell`'s run at `lr` keeps: the search reads no rate, so a PerFIT
    cell searches at its first candidate only (its mask cell's, `Cell.masks`, where it has one);
    empty: this run searches (or has fixed masks)."""
    if cell.masks:
        return f"{cell.masks}/{lr_label(lrs[0])}"
    if cell.fields.get("method") != "perfit" or lr == lrs[0]:
        return ""
    return tuning_name(cell, lrs[0])


def tuning_name(cell: Cell, lr: float) -> str:
    """The name (and directory under the tuning's out) of `cell`'s run at candidate rate `lr`."""
    return f"{cell.name}/{lr_label(lr)}"


def choose(validation_ppl: dict[float, float]) -> float:
    """The rate with the lowest finite validation perplexity; a tie goes to the smaller rate."""
    finite = {lr: ppl for lr, ppl in validation_ppl.items() if math.isfinite(ppl)}
    if not finite:
        raise ValueError("no candidate learning rate finished with a finite validation perplexity")
    return min(sorted(finite), key=lambda lr: finite[lr])


def edge(chosen: float, lrs: tuple[float, ...]) -> str | None:
    """`largest` / `smallest` when the choice is at an end of the candidates (the optimum may lie
    beyond it: widen `--lrs`), else None. One candidate is no search: None."""
    if len(lrs) < 2:
        return None
    return "largest" if chosen == max(lrs) else "smallest" if chosen == min(lrs) else None


def beyond(lr: float, side: str) -> float:
    """The next rate past `lr` on the half-decade ladder 1, 3, 10, 30 x 10^k that the usual candidates
    sit on: the largest ladder rate below lr / 1.5 (`side` "smallest") or the smallest above 1.5 lr
    ("largest"), so a rate off the ladder still steps at least 1.5x."""
    exponent = math.floor(math.log10(lr))
    ladder = [float(f"{mantissa}e{e}") for e in range(exponent - 2, exponent + 3) for mantissa in (1, 3)]
    if side == "largest":
        return min(rate for rate in ladder if rate > 1.5 * lr)
    return max(rate for rate in ladder if rate < lr / 1.5)


def candidates(measured: Mapping[float, float], lrs: tuple[float, ...], widen: int = 0) -> tuple[float, ...]:
    """The rates a cell runs, sorted: `lrs`, and, while all of them have finished and the choice is at
    an end (`edge`), the next rate past that end (`beyond`), at most `widen` times. A pure function of
    the finished runs' validation perplexities (`measured`: rate -> perplexity)."""
    rates = sorted(lrs)
    for _ in range(widen):
        if any(lr not in measured for lr in rates) or not any(math.isfinite(measured[lr]) for lr in rates):
            break
        chosen = choose({lr: measured[lr] for lr in rates})
        side = edge(chosen, tuple(rates))
        if side is None:
            break
        rates = sorted([*rates, beyond(chosen, side)])
    return tuple(rates)


def collect(
    cells: list[Cell],
    out: Path,
    lrs: tuple[float, ...] = LRS,
    widen: int = 0,
    transcribed: Mapping[str, Mapping[float, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per cell: its candidates (`lrs`, widened past an end by `candidates`), the validation
    perplexity of each finished one and, once all have finished, the chosen rate and whether it is
    still at an end. Reads only the run directories' summaries, and for a rate without a finished run
    the value `transcribed` gives (`read_transcribed`; listed in the entry's "transcribed")."""
    from perfit.federation.run_directory import degraded, read_summary

    table: dict[str, dict[str, Any]] = {}
    for cell in cells:
        measured: dict[float, float] = {}
        rejected: list[float] = []  # rates whose run counted a round short of a client
        copied: list[float] = []  # rates whose value is transcribed, not read off a run here
        rates: tuple[float, ...] = ()
        while (more := candidates(measured, lrs, widen)) != rates:
            rates = more
            for lr in rates:
                summary_path = out / tuning_name(cell, lr) / "seed0" / "summary.json"
                if lr not in measured and summary_path.is_file():
                    summary = read_summary(summary_path)
                    if summary.get("evaluated_on") != "validation":
                        raise ValueError(f"{summary_path}: not a validation run (evaluated_on is missing or held_out)")
                    measured[lr] = float(summary["personalized_ppl"])
                    rejected += [lr] if degraded(summary) else []
                elif lr not in measured and lr in (transcribed or {}).get(cell.name, {}):
                    measured[lr] = float(transcribed[cell.name][lr])
                    copied.append(lr)
        entry: dict[str, Any] = {
            "lrs": list(rates),
            "validation_ppl": {f"{lr:g}": measured[lr] for lr in rates if lr in measured},
            "rejected_updates": sorted(rejected),
        }
        if copied:
            entry["transcribed"] = [f"{lr:g}" for lr in sorted(copied)]
        if len(measured) == len(rates):
            entry["chosen_lr"] = choose(measured)
            entry["edge"] = edge(entry["chosen_lr"], rates)
        table[cell.name] = entry
    return table


def read_transcribed(path: Path) -> tuple[str, dict[str, dict[float, float]]]:
    """(source, cell name -> rate -> validation perplexity) from a JSON file of tuning results whose
    runs are gone (`{"source": ..., "cells": {"<cell>": {"<rate>": <ppl>}}}`), e.g. copied from the
    lab notebook after the runs' machine was lost. `source` says where each value was read; a value
    that is not a positive number, or a rate that is not one, is a ValueError naming it."""
    try:
        document = json.loads(Path(path).read_text())
        source, cells = document["source"], document["cells"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a transcribed tuning file ({type(err).__name__}: {err})") from err
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{path}: field source: say where the values were read")
    table: dict[str, dict[float, float]] = {}
    for name, values in cells.items():
        for rate, ppl in values.items():
            try:
                lr, value = float(rate), float(ppl)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: cells.{name}.{rate}: not a rate and a perplexity ({err})") from err
            if not (lr > 0 and math.isfinite(value) and value > 0):
                raise ValueError(f"{path}: cells.{name}.{rate}: {ppl!r} is not a perplexity at a positive rate")
            table.setdefault(name, {})[lr] = value
    return source, table


def still_to_run(
    runs: list[Cell],
    transcribed: Mapping[str, Mapping[float, float]],
    out: Path,
    selected: set[str] | None = None,
) -> list[Cell]:
    """The tuning runs (`tuning_cells`) to run: a rate with a transcribed value (`read_transcribed`),
    or a run of a cell outside `selected` (cell names; None: all), does not run, unless a run still to
    go builds on it (`Cell.sources`: FIT + FT starts from FIT's run, a PerFIT run keeps another run's
    masks), which needs its files."""

    def finished(run: Cell) -> bool:
        return (run.run_dir(out, 0) / "summary.json").is_file()

    def left_out(run: Cell) -> bool:
        base = run.name.rsplit("/", 1)[0]
        copied = float(run.fields["lr"]) in transcribed.get(base, {}) and not finished(run)
        return copied or (selected is not None and base not in selected)

    keep = {run.name for run in runs if not left_out(run)}
    while True:
        needed = {name for run in runs if run.name in keep and not finished(run) for name in run.sources.values()}
        needed -= keep
        if not needed:
            return [run for run in runs if run.name in keep]
        keep |= needed


def tuned(cells: list[Cell], path: Path) -> list[Cell]:
    """The cells with the learning rate chosen in a `docs/tuning.json`; a cell without a choice is
    an error (a grid half at tuned and half at default rates would compare unlike with unlike)."""
    try:
        choices = json.loads(Path(path).read_text())["cells"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a tuning.json from `perfit bench tune` ({err})") from err
    missing = [c.name for c in cells if "chosen_lr" not in choices.get(c.name, {})]
    if missing:
        raise ValueError(f"{path}: no tuned learning rate for {', '.join(missing)}; run `perfit bench tune` on them")
    return [replace(c, fields={**c.fields, "lr": choices[c.name]["chosen_lr"]}) for c in cells]


def tuning_table(table: dict[str, dict[str, Any]], lrs: tuple[float, ...]) -> list[str]:
    """Markdown rows: one per cell, validation perplexity per candidate (`lrs` and every rate a cell
    was widened to), the choice in bold."""
    lrs = tuple(sorted({*lrs, *(float(lr) for entry in table.values() for lr in entry["validation_ppl"])}))
    lines = ["| cell | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |", "|---|" + "---|" * (len(lrs) + 1)]
    for name, entry in table.items():
        chosen = entry.get("chosen_lr")
        cells = []
        for lr in lrs:
            ppl = entry["validation_ppl"].get(f"{lr:g}")
            text = "–" if ppl is None else f"{ppl:.3f}" + ("†" if f"{lr:g}" in entry.get("transcribed", ()) else "")
            cells.append(f"**{text}**" if chosen == lr else text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'pending' if chosen is None else f'{chosen:g}'} |")
    return lines


def tuning_markdown(
    table: dict[str, dict[str, Any]], lrs: tuple[float, ...], command: str, transcribed_source: str = ""
) -> str:
    """docs/tuning.md; `transcribed_source`: where the transcribed values (†) were read."""
    lines = [
        "# Learning rates chosen on a validation slice (`perfit bench tune`)",
        "",
        f"Command: `{command}`. Each client's train split is split again 80/20; runs train on the 80 % and",
        "are scored on the 20 % validation slice (personalized perplexity, seed 0). The held-out rows of",
        "docs/results.md are never read here. The lowest validation perplexity wins, the same rule for",
        "every method.",
        "",
        *tuning_table(table, lrs),
    ]
    rejected = [
        f"{name} (lr {', '.join(f'{lr:g}' for lr in entry['rejected_updates'])})"
        for name, entry in table.items()
        if entry.get("rejected_updates")
    ]
    if rejected:
        lines += [
            "",
            "Runs that rejected a client's update (a round counted fewer clients) or restarted a node's kept values: "
            + ", ".join(rejected)
            + ".",
        ]
    if any(entry.get("transcribed") for entry in table.values()):
        lines += ["", f"†: transcribed, not read off a run here (the run is gone): {transcribed_source}."]
    at_edge = [f"{name} ({entry['edge']})" for name, entry in table.items() if entry.get("edge")]
    if at_edge:
        lines += [
            "",
            "Chosen at an end of the candidates, so the best rate may lie beyond it (widen `--lrs` or `--widen`): "
            + ", ".join(at_edge)
            + ".",
        ]
    return "\n".join(lines) + "\n"
