"""`perfit report`: docs/results.md, docs/results.json and docs/figures/*.png from the run directories
of `perfit bench paper`. Everything is computed from the runs' summary.json, metrics.jsonl,
config.toml and masks; nothing is typed in by hand. The document's body is `bench.report_markdown`'s;
here it is assembled with the sections on mask diagnostics, tuning and personalization
(`bench.personal_report`, which draws its own figure), and the paper grid's figures are drawn."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from perfit.bench.diagnostics import mask_diagnostics
from perfit.bench.experiments import (
    SCALE_PRESET,
    SPLIT_TITLES,
)
from perfit.bench.figures import bar_figure, figure_loss_curves, figure_mask_similarity
from perfit.bench.personal_report import FIGURE as PERSONAL_FIGURE
from perfit.bench.personal_report import section as personal_section
from perfit.bench.report_markdown import markdown_table, results_markdown
from perfit.bench.results import (
    CellResult,
    headline,
    load_results,
    lr_text,
    metrics_comparison,
    participation,
    tuned_comparison,
)
from perfit.federation.run_directory import json_safe


def _diagnostics_section(diagnostics: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Do the masks follow the data? One row per PerFIT run with searched masks."""
    if not diagnostics:
        return []
    rows = [
        [name, seed, f"{d['mean_pairwise_overlap']:.3f}", f"{d['overlap_with_data_free_mask']:.3f}",
         _number(d["mask_vs_data_similarity_r"]), _p_value(d.get("mask_vs_data_similarity_p"))]
        for name, seeds in diagnostics.items()
        for seed, d in seeds.items()
    ]  # fmt: skip
    header = ["cell", "seed", "pairwise kept overlap", "overlap with data-free mask", "r (mask vs data overlap)",
              "r's p"]  # fmt: skip
    return [
        "## Mask diagnostics",
        "",
        "Do the searched masks follow the clients' data? Pairwise kept overlap: the share of one client's kept",
        "positions another client keeps too (two random masks at half the positions: about 0.5). Overlap with the",
        "data-free mask: the share of a client's kept positions among the top-k of |theta_0|, the seeded adapter",
        "every client scores (what a client would keep without data). r: Pearson correlation, over client pairs,",
        "of mask overlap with data overlap (cosine of the clients' category histograms); r's p: the share of",
        "relabellings of the clients whose r is at least as high (one-sided Mantel test). A search that",
        "personalizes shows low overlaps and a high r, beyond chance.",
        "",
        markdown_table(rows, header),
        "",
    ]


def _tuning_section(out: Path, lr: str) -> list[str]:
    """The learning rates `perfit bench tune` chose (docs/tuning.json beside the report), if any."""
    from perfit.bench.tuning import tuning_table

    path = out / "tuning.json"
    if not path.is_file():
        return []
    tuning = json.loads(path.read_text())
    return [
        "## Learning rate on a validation slice",
        "",
        f"The runs above use lr {lr}. `perfit bench tune` scores candidate rates on a 20 % validation",
        "slice of each client's train split (the held-out rows are never read; [tuning.md](tuning.md),",
        f"`{tuning['command']}`):",
        "",
        *tuning_table(tuning["cells"], tuple(tuning["lrs"])),
        "",
    ]


def _tuned_section(table: dict[str, dict[str, Any]], tuned_runs: Path) -> list[str]:
    if not table:
        return []
    seeds = sorted({int(s) for entry in table.values() for s in entry["personalized_ppl"]})
    rows = [
        [
            name,
            " / ".join(f"{lr:g}" for lr in entry["lr"]),
            *(_number(entry["personalized_ppl"].get(str(s))) for s in seeds),
            _number(entry["over_fit_tuned"], "x"),
            _number(entry["over_grid_rate"], "x"),
        ]
        for name, entry in table.items()
    ]
    header = ["cell", "lr", *(f"seed {s}" for s in seeds), "over FIT (tuned)", "over itself at the grid's rate"]
    return [
        "## At the tuned learning rates (held-out rows)",
        "",
        f"`perfit bench paper --tuned docs/tuning.json --out {tuned_runs}` runs cells at their chosen rates and",
        "scores them on the held-out rows like the grid; ratios are paired over the seeds both cells finished.",
        "Where those runs were made at another commit than the grid, the last column compares code versions too.",
        "",
        markdown_table(rows, header),
        "",
    ]


def _p_value(value: float | None) -> str:
    """A permutation p-value to 4 digits (its least is 1/10,000); n/a for a run read before p was."""
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "n/a"


def _number(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}{unit}" if unit else f"{value:.3f}"


def write_report(
    runs: Path,
    out: Path,
    tuned_runs: Path | None = None,
    personal_runs: Path | None = None,
    personal_tuning: Path | None = None,
) -> list[Path]:
    """`perfit report`: docs/results.md and results.json (and figures/) from the paper grid's runs at
    `runs`; with the tuned grid's runs (`tuned_runs`) its section, and with the personalization
    grid's (`personal_runs`, its tuning.json `personal_tuning`) that section. Returns the files written."""
    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs}: no grid directory; run `perfit bench paper --out {runs}` first")
    results = load_results(runs)
    if not sum(len(r.runs) for r in results.values()):
        raise FileNotFoundError(f"{runs}: no finished run yet; run `perfit bench paper --out {runs}`")
    head = headline(results)
    drawn, part, comparison, written = _draw_figures(results, out / "figures")
    machine = _machine(runs)
    document = {"machine": machine, "scale_preset": SCALE_PRESET, "headline": head, "cells": _cells(results)}
    diagnostics = {
        name: found
        for name, result in results.items()
        if (found := {str(seed): d for seed, run in sorted(result.runs.items()) if (d := mask_diagnostics(run["dir"]))})
    }
    document["mask_diagnostics"] = diagnostics
    tuned = tuned_comparison(load_results(tuned_runs), results) if tuned_runs is not None else {}
    if tuned:
        document["tuned"] = {"runs": str(tuned_runs), "cells": tuned}
    personal: list[str] = []
    personal_figure = out / "figures" / PERSONAL_FIGURE
    if personal_runs is not None:  # the personalization grid, its variant chosen by its own tuning
        document["personal"], personal = personal_section(personal_runs, personal_tuning, out / "figures")
        written += [personal_figure] if personal_figure.is_file() else []
    else:  # an earlier report's figure of that section would be left without its section
        personal_figure.unlink(missing_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(document), indent=2) + "\n")
    sections = (
        personal
        + _diagnostics_section(diagnostics)
        + _tuning_section(out, lr_text(results))
        + _tuned_section(tuned, tuned_runs)
    )
    tuned_from = tuned_runs if tuned else None
    text = results_markdown(results, head, machine, drawn, comparison, part, runs, sections, tuned_from)
    (out / "results.md").write_text(text)
    return [out / "results.md", out / "results.json", *written]


def _draw_figures(results: dict[str, CellResult], figures: Path) -> tuple[dict[str, bool], Any, Any, list[Path]]:
    """The report's figures (Figs. 3-7): which were drawn (a figure needs two or more series), the
    participation and importance-metric comparisons they draw, and the files written."""
    figures.mkdir(parents=True, exist_ok=True)
    drawn = {
        "loss": figure_loss_curves(results, figures / "loss_curves.png"),
        "similarity": figure_mask_similarity(results, figures / "mask_similarity.png"),
    }
    part = participation(results)
    drawn["participation"] = bar_figure(
        figures / "participation.png",
        "Participation per round, 20 clients, Dirichlet(0.5), seed 0",
        part,
        "personalized perplexity (lower is better)",
    )
    comparison = metrics_comparison(results)
    drawn["metric"] = bar_figure(
        figures / "importance_metric.png",
        "Importance metric (s=0.5, seed 0)",
        {SPLIT_TITLES[s]: {m: v[0] for m, v in c.items()} for s, c in comparison.items()},
        "personalized perplexity (lower is better)",
    )
    files = {"loss": "loss_curves.png", "similarity": "mask_similarity.png", "participation": "participation.png",
             "metric": "importance_metric.png"}  # fmt: skip
    return drawn, part, comparison, [figures / files[name] for name, ok in drawn.items() if ok]


def _machine(runs: Path) -> dict[str, Any]:
    """Where the report was made, and which code made the runs: the note kept beside them (the grid
    runs from one fixed checkout over several sittings, so that all cells share one algorithm)."""
    from perfit.client.hardware import cpu_description, cpu_has_bf16

    return {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "code": (runs / "PROVENANCE.md").read_text().strip() if (runs / "PROVENANCE.md").is_file() else "",
        "training dtype": "bf16 autocast (dtype=auto)" if cpu_has_bf16() else "fp32 (dtype=auto)",
    }


def _cells(results: dict[str, CellResult]) -> dict[str, dict[str, Any]]:
    """results.json's cells: each one's config, seeds run and planned, perplexities, mean and spread."""
    return {
        name: {
            "config": {**result.cell.fields, "split": result.cell.split, "preset": SCALE_PRESET, "lr": result.lrs()},
            "seeds": sorted(result.runs),
            "seeds_planned": list(result.cell.seeds),
            "personalized_ppl": {str(s): v for s, v in result.ppl.items()},
            "mean": result.mean if result.runs else None,
            "std": result.std if len(result.runs) > 1 else None,  # one seed measures no spread
            "wall_seconds": {str(s): r["summary"]["wall_seconds"] for s, r in sorted(result.runs.items())},
        }
        for name, result in results.items()
    }
