"""`perfit report`: docs/results.md, docs/results.json and docs/figures/*.png from the run directories
of `perfit bench paper`. Everything is computed from the runs' summary.json, metrics.jsonl,
config.toml and masks; nothing is typed in by hand."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from perfit.bench.diagnostics import mask_diagnostics
from perfit.bench.experiments import (
    LABELS,
    PERSONALIZED_BASELINES,
    SCALE_PRESET,
    SPLIT_TITLES,
    SPLITS,
)
from perfit.bench.figures import bar_figure, figure_loss_curves, figure_mask_similarity
from perfit.bench.results import (
    CellResult,
    exceeds_spread,
    headline,
    load_results,
    lr_text,
    metrics_comparison,
    paired_ratio,
    participation,
    tuned_comparison,
)
from perfit.federation.run_directory import json_safe


def _fmt(result: CellResult, reference: CellResult | None = None) -> str:
    if not result.runs:
        return "not run yet"
    text = f"{result.mean:.3f} ± {result.std:.3f}" if len(result.runs) > 1 else f"{result.mean:.3f}"
    if reference is not None and reference.runs and reference is not result:
        change = 100 * (paired_ratio(result, reference) - 1)  # over the seeds both finished
        mark = " *" if exceeds_spread(result, reference) else ""
        text += f" ({change:+.1f} %{mark})" if math.isfinite(change) else " (no common seed)"
    if not result.complete:
        text += f" [{len(result.runs)}/{len(result.cell.seeds)} seeds]"
    return text


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _params(cells: list[CellResult]) -> str:
    """Trainable parameters per client (a range for heterogeneous budgets), from the first finished run."""
    for cell in cells:
        for run in cell.runs.values():
            values = sorted(set(run["summary"]["trainable_params_per_client"].values()))
            return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}-{values[-1]:,}"
    return ""


def _method_table(results: dict[str, CellResult], names: list[str], reference: str) -> str:
    rows = []
    for label, by_split in [(LABELS.get(n.split("/")[-1], n.split("/")[-1]), n) for n in names]:
        cells = [results[by_split.replace("{split}", split)] for split in SPLITS]
        refs = [results[reference.replace("{split}", split)] for split in SPLITS]
        rows.append([label, *[_fmt(c, r) for c, r in zip(cells, refs, strict=True)], _params(cells)])
    return _table(rows, ["method", *[SPLIT_TITLES[s] for s in SPLITS], "trainable / client"])


def _search_seconds(result: CellResult, seed: int = 0) -> str:
    run = result.runs.get(seed)
    return f"{run['summary'].get('search_seconds', 0.0):.0f} s" if run else ""


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
        _table(rows, header),
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
        _table(rows, header),
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
    if personal_runs is not None:  # the personalization grid, its variant chosen by its own tuning
        from perfit.bench.personal_report import FIGURE, section

        document["personal"], personal = section(personal_runs, personal_tuning, out / "figures")
        written += [out / "figures" / FIGURE] if (out / "figures" / FIGURE).is_file() else []
    (out / "results.json").write_text(json.dumps(json_safe(document), indent=2) + "\n")
    sections = (
        personal
        + _diagnostics_section(diagnostics)
        + _tuning_section(out, lr_text(results))
        + _tuned_section(tuned, tuned_runs)
    )
    text = markdown(results, head, machine, drawn, comparison, part, runs, sections, tuned_runs if tuned else None)
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


QUALITY_BAR = {"pathological": 0.75, "dirichlet": 0.78}


def quality_bar(head: dict[str, dict[str, float]]) -> list[str]:
    """One line per split: whether PerFIT's measured ratio to FIT meets the issue's bar."""
    lines = []
    for split, bar in QUALITY_BAR.items():
        value = head["perfit_over_fit"][split]
        if not math.isfinite(value):
            lines.append(f"- {SPLIT_TITLES[split]}: PerFIT vs FIT not measured yet (bar {bar}).")
            continue
        verdict = "**met**" if value <= bar else "**not met**"
        lines.append(f"- {SPLIT_TITLES[split]}: PerFIT / FIT = {value:.3f} against a bar of {bar}: {verdict}.")
    return lines


def markdown(
    results, head, machine, drawn, comparison, part, runs: Path, tuning: list[str] = (), tuned_runs: Path | None = None
) -> str:
    """docs/results.md: how it was made, the headline, the paper's tables, figures, ablations, the
    learning-rate sections (`tuning`) and every run."""
    sections = (
        _introduction(results, machine, runs, tuned_runs),
        _headline(head),
        _tables(results),
        _figures_section(drawn, comparison, part),
        _ablations(results),
        list(tuning),
        _every_run(results),
    )
    return "\n".join(line for section in sections for line in section)


def _introduction(results, machine, runs: Path, tuned_runs: Path | None) -> list[str]:
    done = sum(len(r.runs) for r in results.values())
    planned = sum(len(r.cell.seeds) for r in results.values())
    wall = sum(r.wall() for r in results.values())
    return [
        "# Results: the paper's experiments at laptop scale",
        "",
        "Generated by `perfit report` from the run directories of `perfit bench paper`; every number below",
        "is computed from them.",
        "",
        "```",
        "perfit bench paper --out runs/paper --data ../shared/data/databricks-dolly-15k.jsonl   # or: make bench",
        f"perfit report --runs {runs} --out docs" + (f" --tuned-runs {tuned_runs}" if tuned_runs else ""),
        "```",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; local training in {machine['training dtype']};"
        " evaluation in fp32.",
        *([f"- Code: {machine['code']}"] if machine["code"] else []),
        f"- Progress: **{done} of {planned} runs finished**, {wall / 3600:.1f} h of wall time in all."
        + (
            ""
            if done == planned
            else " Cells marked `not run yet` or `[1/2 seeds]` are still to run; "
            "`perfit bench paper` continues where it stopped."
        ),
        f"- Scale: the `{SCALE_PRESET}` preset for every cell: 8 clients, 4 sampled per round, 3 rounds, 32 rows",
        f"  per client (26 train, 6 held out for personalized perplexity), 256 tokens, batch 8, lr {lr_text(results)},",
        "  T_p 5 scoring steps of 1 micro-batch, SmolLM2-135M-Instruct, LoRA on q/k/v at the budget of rank 8.",
        "  This is what 2 CPU cores afford (5-6 min a run); the paper's setting is the `paper` preset.",
        "- Personalized perplexity: each client's own adapter on its own held-out rows, mean over the 8 clients;",
        "  lower is better. `mean ± std` over seeds (sample std); `(+x %)` is the change against the row's",
        "  reference (FIT); `*` marks a difference beyond the seed spread, paired by seed (a seed fixes the",
        "  partition for every method): the same sign at every seed and |mean change| > std of the changes.",
        "",
    ]


def _headline(head) -> list[str]:
    return [
        "## Headline",
        "",
        _table(
            [[k, *[f"{head[k][s]:.3f}" if math.isfinite(head[k][s]) else "n/a" for s in SPLITS]] for k in head],
            ["ratio (lower is better for PerFIT)", *[SPLIT_TITLES[s] for s in SPLITS]],
        ),
        "",
        *quality_bar(head),
        "",
        "Every ratio is taken over the seeds both cells finished. `perfit_over_fit`: the paper's PerFIT",
        "(symmetric init), best sparsity, over FIT; `hetero_over_fit`: PerFIT at ranks 8/12/16 over FIT r=8;",
        "`perfit_over_best_baseline`: best PerFIT over the strongest of local only, FIT + local fine-tuning and",
        "FedSA-LoRA; `perfit_zero_b_over_fit`: PerFIT s=0.5 trained from B = 0 after the search at the symmetric",
        "init (the change the init ablation pointed to, perfit's default init since this grid) over FIT, and",
        "`perfit_zero_b_over_best_baseline` the same over the strongest baseline (nan while a baseline has no",
        "seed in common with it: that one could be the strongest). The quality bar is <= 0.75",
        "(pathological) and <= 0.78 (Dirichlet) over FIT: about the paper's largest gains (Table 1, Alpaca-7B",
        "at rank 12: 23 % and 21 % below FIT; Vicuna-7B gained 1-3 %).",
        "",
    ]


def _tables(results) -> list[str]:
    return [
        "## Table 1: homogeneous budgets (rank-8 budget; personalized perplexity)",
        "",
        _method_table(
            results,
            [
                "table1/{split}/fit",
                *[f"table1/{{split}}/perfit-s{s}" for s in (0.33, 0.5, 0.66)],
                "table1/{split}/perfit-s0.5-zero-b",
            ],
            "table1/{split}/fit",
        ),
        "",
        "## Baselines at equal trainable parameters (rank 8)",
        "",
        _method_table(
            results,
            [
                "table1/{split}/fit",
                *[f"baselines/{{split}}/{b}" for b in PERSONALIZED_BASELINES],
                "table1/{split}/perfit-s0.5",
            ],
            "table1/{split}/fit",
        ),
        "",
        "- local only: each client trains alone for the epochs it gets in expectation in the federated runs;",
        "- FIT + local fine-tuning: FIT's final adapter fine-tuned one epoch on each client's train rows;",
        "- FedSA-LoRA: A matrices averaged, B matrices kept by their client (Guo et al., ICLR 2025).",
        "",
        "## Table 2: heterogeneous budgets (clients in thirds at ranks 8 / 12 / 16)",
        "",
        _method_table(
            results,
            ["table1/{split}/fit", "table2/{split}/perfit-8-12-16", "table2/{split}/hetlora-8-12-16"],
            "table1/{split}/fit",
        ),
        "",
        "HetLoRA (Cho et al., EMNLP 2024): rank truncation, zero-padding aggregation with ||BA||_F weights.",
        "",
    ]


def _figures_section(drawn, comparison, part) -> list[str]:
    lines = ["## Figures", ""]
    if drawn["loss"]:
        lines += [
            "### Loss curves (Fig. 3/4)",
            "",
            "![loss curves](figures/loss_curves.png)",
            "",
            "Each point is the mean local training loss of that round's sampled clients. Different clients are",
            "sampled each round, so rounds are not comparable with each other; methods are, since every method",
            "samples the same clients for a seed.",
            "",
        ]
    if drawn["similarity"]:
        sim = drawn["similarity"]
        lines += [
            "### Mask similarity (Fig. 5)",
            "",
            "![mask similarity](figures/mask_similarity.png)",
            "",
            "Mean pairwise similarity of the first module's masks: "
            + ", ".join(f"{SPLIT_TITLES[s]} {v[0]:.3f}" for s, v in sim.items())
            + ". Pearson correlation, over client pairs, between the overlap of their data (cosine of their"
            " category histograms) and the similarity of their masks: "
            + ", ".join(f"{SPLIT_TITLES[s]} {v[1]:.2f}" for s, v in sim.items())
            + ". All clients score the same seeded dense adapter, so masks share much by construction;"
            " the correlation shows how much of the rest follows the data.",
            "",
        ]
    if drawn["participation"]:
        lines += [
            "### Participation per round (Fig. 6)",
            "",
            "![participation](figures/participation.png)",
            "",
            _table(
                [[k, *[f"{v.get(m, math.nan):.3f}" for m in ("FIT", "PerFIT")]] for k, v in part.items()],
                ["participation", "FIT", "PerFIT"],
            ),
            "",
        ]
    if drawn["metric"]:
        rows = [
            [SPLIT_TITLES[s], m, f"{v[0]:.3f}", f"{v[1]:.1f} s"] for s, c in comparison.items() for m, v in c.items()
        ]
        lines += [
            "### Importance metric (Fig. 7)",
            "",
            "![importance metric](figures/importance_metric.png)",
            "",
            _table(rows, ["split", "metric", "personalized ppl", "search per client"]),
            "",
        ]
    return lines


def _ablations(results) -> list[str]:
    ablations = [r for n, r in results.items() if n.startswith("ablation/")]
    reference = results["table1/pathological/perfit-s0.5"]
    at_seed_0 = f"{reference.ppl[0]:.3f}" if 0 in reference.runs else "not run yet"
    return [
        "## Ablations (pathological, seed 0)",
        "",
        "Reference: PerFIT s=0.5 as in Table 1 (symmetric init, shared aggregation, global scope, T_p 5,",
        "1 scoring batch, alpha 32) at seed 0, the ablations' seed; each row changes one setting. Search:",
        "the clients' search seconds summed.",
        "",
        _table(
            [["reference", at_seed_0, _search_seconds(reference)]]
            + [[r.cell.label, _fmt(r, reference), _search_seconds(r)] for r in ablations],
            ["setting", "personalized ppl (change vs reference)", "search"],
        ),
        "",
    ]


def _every_run(results) -> list[str]:
    rows = []
    for name, result in results.items():
        for seed, run in sorted(result.runs.items()):
            summary = run["summary"]
            rows.append(
                [
                    name,
                    str(seed),
                    f"{summary['personalized_ppl']:.3f}",
                    f"{summary['wall_seconds']:.0f} s",
                    f"{summary.get('search_seconds', 0.0):.0f} s",
                ]
            )
    return ["## Every run", "", _table(rows, ["cell", "seed", "personalized ppl", "wall", "search (clients)"]), ""]
