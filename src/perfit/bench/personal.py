"""Does personalization pay at the paper's data per client? The personalization grid's results
(`perfit bench paper --grid personal`) for the report: per split, every method over the held-out
seeds, paired by seed against FIT and against the strongest baseline that ends with a model per
client, with ROUGE-L and the PerFIT variants' mask diagnostics, and the goal checked seed by seed.

The PerFIT variant a claim is made for is the one seed 0's validation slice chose (`perfit bench
tune --grid personal`: the lowest validation perplexity among the variants, each at its own chosen
rate); the report never picks it on the held-out seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from perfit.bench.experiments import PERSONAL_VARIANTS, PERSONALIZED_BASELINES, SPLITS, personalization_grid
from perfit.bench.results import CellResult, load_results, paired_ratio

GOAL = {"over_fit": 0.95, "over_best_baseline": 0.97, "mask_r": 0.5}
"""A PerFIT method counts as paying where, at every held-out seed, its personalized perplexity is at
most 0.95x FIT's and 0.97x the strongest baseline's, its ROUGE-L is no worse than FIT's, and its
masks' similarity follows the clients' data similarity (r at least 0.5)."""


def load(runs: Path) -> dict[str, CellResult]:
    return load_results(runs, personalization_grid())


def chosen_variants(tuning: dict[str, Any] | None) -> dict[str, str | None]:
    """Per split, the PerFIT variant (a label of PERSONAL_VARIANTS) with the lowest validation
    perplexity at its chosen rate, from a tuning.json's `cells`; None until every variant is tuned."""
    chosen: dict[str, str | None] = {}
    for split in SPLITS:
        scores = {}
        for label in PERSONAL_VARIANTS:
            entry = (tuning or {}).get(f"personal/{split}/{label}", {})
            if "chosen_lr" in entry:
                scores[label] = entry["validation_ppl"][f"{entry['chosen_lr']:g}"]
        complete = len(scores) == len(PERSONAL_VARIANTS)
        chosen[split] = min(scores, key=lambda label: scores[label]) if complete else None
    return chosen


def _per_seed(a: CellResult, b: CellResult) -> dict[int, float]:
    return {seed: a.ppl[seed] / b.ppl[seed] for seed in sorted(set(a.runs) & set(b.runs))}


def _rouge(result: CellResult) -> float:
    values = [run["summary"]["rouge_l"] for run in result.runs.values() if "rouge_l" in run["summary"]]
    return statistics.fmean(values) if values else math.nan


def _mask_r(result: CellResult) -> float:
    from perfit.bench.diagnostics import mask_diagnostics

    values = [d["mask_vs_data_similarity_r"] for run in result.runs.values() if (d := mask_diagnostics(run["dir"]))]
    return statistics.fmean(values) if values else math.nan


def summarize(results: dict[str, CellResult], tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per split: every cell's mean perplexity, paired ratio to FIT (and per seed), ROUGE-L and mask
    r; the chosen variant and the goal's four checks for it (None where not yet measurable)."""
    out: dict[str, Any] = {"goal": GOAL, "splits": {}}
    chosen = chosen_variants(tuning)
    for split in SPLITS:
        fit = results[f"personal/{split}/fit"]
        baselines = [results[f"personal/{split}/{b}"] for b in PERSONALIZED_BASELINES]
        cells = {}
        for result in results.values():
            if result.cell.split != split or not result.runs:
                continue
            cells[result.cell.label] = {
                "seeds": sorted(result.runs),
                "personalized_ppl": result.mean,
                "over_fit": paired_ratio(result, fit),
                "over_fit_per_seed": {str(s): v for s, v in _per_seed(result, fit).items()},
                "rouge_l": _rouge(result),
                "mask_r": _mask_r(result) if result.cell.fields.get("method") == "perfit" else math.nan,
            }
        variant = chosen[split]
        split_out: dict[str, Any] = {"cells": cells, "chosen_variant": variant, "goal_met": None}
        if variant is not None and variant in cells:  # the chosen variant has held-out runs
            split_out.update(_goal(results[f"personal/{split}/{variant}"], cells[variant], fit, baselines))
        out["splits"][split] = split_out
    return out


def _goal(method: CellResult, read: dict[str, Any], fit: CellResult, baselines: list[CellResult]) -> dict[str, Any]:
    """The goal's checks for `method` (`read`: its ROUGE-L and mask r as `summarize` read them),
    every one over the seeds it shares with the other cell."""
    over_fit = _per_seed(method, fit)
    against = {b.cell.label: _per_seed(method, b) for b in baselines if b.runs}
    seeds = sorted({seed for ratios in against.values() for seed in ratios})
    worst = {str(seed): max(r[seed] for r in against.values() if seed in r) for seed in seeds}
    checks = {
        "over_fit_every_seed": bool(over_fit) and all(v <= GOAL["over_fit"] for v in over_fit.values()),
        "over_best_baseline_every_seed": bool(worst) and all(v <= GOAL["over_best_baseline"] for v in worst.values()),
        "rouge_l_not_below_fit": read["rouge_l"] >= _rouge(fit),  # NaN (not measured) compares False
        "masks_follow_data": read["mask_r"] >= GOAL["mask_r"],
    }
    return {"over_best_baseline_per_seed": worst, "checks": checks, "goal_met": all(checks.values())}


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "–"


def markdown(summary: dict[str, Any], runs: Path) -> list[str]:
    """The report's section: one table per split and the goal's verdict, said plainly."""
    lines = [
        "## Does personalization pay at the paper's data per client?",
        "",
        f"The personalization grid (`perfit bench paper --grid personal --out {runs}`): the `medium` preset, "
        "each client holding a client's share of the paper's 100-client split (120 train / 30 held-out "
        "rows), 10 clients, 3 a round, 10 rounds, batch 64; every method at its rate chosen on seed 0's "
        "validation slice; held-out seeds 1-3, each ratio paired by seed. ROUGE-L: greedy answers to 6 "
        "held-out rows per client. r: correlation of mask overlap with category overlap over client pairs.",
        "",
    ]
    for split, found in summary["splits"].items():
        lines += [
            f"### {split}",
            "",
            "| method | seeds | pers. ppl | / FIT | ROUGE-L | mask r |",
            "|---|---|---|---|---|---|",
        ]
        for label, cell in found["cells"].items():
            marker = " (chosen on validation)" if label == found["chosen_variant"] else ""
            seeds = ",".join(map(str, cell["seeds"]))
            numbers = [_number(cell["personalized_ppl"]), _number(cell["over_fit"], 4), _number(cell["rouge_l"])]
            lines.append(f"| {label}{marker} | {seeds} | " + " | ".join(numbers) + f" | {_number(cell['mask_r'], 2)} |")
        lines.append("")
        if found["chosen_variant"] is None:
            lines += ["No PerFIT variant chosen yet (its tuning on seed 0 is not complete): no claim.", ""]
        elif found.get("goal_met") is None:
            lines += [f"Chosen variant `{found['chosen_variant']}`: no held-out run yet, no claim.", ""]
        else:
            failed = [name for name, ok in found["checks"].items() if not ok]
            verdict = "met" if found["goal_met"] else f"not met ({', '.join(failed)})"
            lines += [f"Goal for `{found['chosen_variant']}` ({GOAL}): **{verdict}**.", ""]
    return lines


def section(runs: Path, tuning_path: Path | None) -> tuple[dict[str, Any], list[str]]:
    """`summarize` of the runs, the variant chosen by a tuning.json (`perfit bench tune --grid
    personal`), and its markdown."""
    tuning = json.loads(tuning_path.read_text())["cells"] if tuning_path is not None else None
    summary = summarize(load(runs), tuning)
    return summary, markdown(summary, runs)


def write(runs: Path, tuning_path: Path | None, out: Path) -> list[Path]:
    """The section on its own, where the paper grid's runs are not at hand: `personalization.md`
    and `personalization.json` in `out` (`perfit report --personal-runs ...` without `--runs`)."""
    from perfit.federation.run_directory import json_safe

    summary, lines = section(runs, tuning_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalization.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    (out / "personalization.md").write_text("\n".join(["# Personalization", "", *lines]))
    return [out / "personalization.md", out / "personalization.json"]
