"""Does personalization pay at the paper's data per client? The personalization grid's results
(`perfit bench paper --grid personal`) for the report: per split, every method over the held-out
seeds, paired by seed against FIT and against the strongest baseline that ends with a model per
client, with ROUGE-L and the PerFIT variants' mask diagnostics, and the goal checked seed by seed.

The PerFIT variant a claim is made for is the one seed 0's validation slice chose (`perfit bench
tune --grid personal`: one variant for both splits, the lowest geometric mean over the splits of
its validation perplexity over FIT's, each at its own chosen rate; `chosen_variants`); the report
never picks it on the held-out seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from perfit.bench.experiments import (
    HELD_OUT_SEEDS,
    PERSONAL_VARIANTS,
    PERSONALIZED_BASELINES,
    SPLITS,
    personalization_grid,
)
from perfit.bench.results import (
    CellResult,
    changes_beyond_spread,
    load_results,
    paired_ratio,
)

GOAL = {"over_fit": 0.95, "over_best_baseline": 0.97, "mask_r": 0.5}
"""A PerFIT method counts as paying where, at every held-out seed, its personalized perplexity is at
most 0.95x FIT's and 0.97x the strongest baseline's at that seed, its ROUGE-L is no worse than FIT's,
and its masks' similarity follows the clients' data similarity (r at least 0.5); the paired changes
agree beyond their seed spread; and it is one method: the same variant in both splits."""


HEADING = "## Does personalization pay at the paper's data per client?"
FIGURE = "personal_over_fit.png"
"""The section's figure, in the report's figures/ folder: each method over FIT, seed by seed."""
FOLLOWING = ("## Mask diagnostics", "## Learning rate on a validation slice", "## At the tuned", "## Every run")
"""The headings `perfit report` writes after this section in results.md, in order: where a results.md
has no such section yet, it goes before the first of them that the document has."""


def load(runs: Path) -> dict[str, CellResult]:
    return load_results(runs, personalization_grid())


def chosen_variants(tuning: dict[str, Any] | None) -> dict[str, str | None]:
    """The PerFIT variant (a label of PERSONAL_VARIANTS) carried on to the held-out seeds, from a
    tuning.json's `cells`: one variant for both splits, since the goal asks for one method. It is the
    variant whose validation perplexity at its chosen rate, over FIT's at FIT's, has the lowest
    geometric mean over the splits: a geometric mean, so that the split with the larger perplexities
    does not outweigh the other (a relative change counts alike in each); over FIT's, so that the
    figure reads as the claim does, a ratio to FIT (dividing by FIT does not change the ranking).
    By split, for the callers; None in each until FIT and every variant are tuned in both."""
    ratios: dict[str, list[float]] = {label: [] for label in PERSONAL_VARIANTS}
    for split in SPLITS:
        fit = _tuned_ppl(tuning, f"personal/{split}/fit")
        for label in PERSONAL_VARIANTS:
            ppl = _tuned_ppl(tuning, f"personal/{split}/{label}")
            if fit is not None and ppl is not None:
                ratios[label].append(ppl / fit)
    complete = all(len(r) == len(SPLITS) for r in ratios.values())
    variant = min(ratios, key=lambda label: math.prod(ratios[label])) if complete else None
    return dict.fromkeys(SPLITS, variant)


def _tuned_ppl(tuning: dict[str, Any] | None, name: str) -> float | None:
    """A tuning.json cell's validation perplexity at its chosen rate; None while it has no chosen rate."""
    entry = (tuning or {}).get(name, {})
    return entry["validation_ppl"][f"{entry['chosen_lr']:g}"] if "chosen_lr" in entry else None


def _per_seed(a: CellResult, b: CellResult) -> dict[int, float]:
    return {seed: a.ppl[seed] / b.ppl[seed] for seed in sorted(set(a.runs) & set(b.runs))}


def paired_claim(changes: list[float]) -> str:
    """What paired per-seed changes (a method's reading minus FIT's, one per held-out seed) let the
    report say: "lower" or "higher" where every seed agrees and the mean change exceeds the seeds'
    sample standard deviation (`changes_beyond_spread`), else "within the seed spread" (or, with a
    reading missing at a seed, that it was not read)."""
    if any(math.isnan(c) for c in changes):
        return "not read at every seed"
    if not changes_beyond_spread(changes):
        return "within the seed spread"
    return "lower" if changes[0] < 0 else "higher"


def _against_fit(result: CellResult, fit: CellResult) -> dict[str, Any] | None:
    """A cell against FIT at every held-out seed, paired by seed: the perplexity ratios and ROUGE-L
    differences, and what each lets the report say (`paired_claim`); None until both have every seed."""
    if result is fit or not all(s in result.runs and s in fit.runs for s in HELD_OUT_SEEDS):
        return None
    ratios = [result.ppl[s] / fit.ppl[s] for s in HELD_OUT_SEEDS]
    rouge = [
        float(result.runs[s]["summary"].get("rouge_l", math.nan))
        - float(fit.runs[s]["summary"].get("rouge_l", math.nan))
        for s in HELD_OUT_SEEDS
    ]
    return {
        "ppl_ratios": ratios,
        "ppl": paired_claim([r - 1 for r in ratios]),
        "rouge_l_differences": rouge,
        "rouge_l": paired_claim(rouge),
    }


def _rouge(result: CellResult) -> float:
    values = [run["summary"]["rouge_l"] for run in result.runs.values() if "rouge_l" in run["summary"]]
    return statistics.fmean(values) if values else math.nan


MASK_READINGS = {
    "mask_pairwise_overlap": "mean_pairwise_overlap",
    "mask_data_free_overlap": "overlap_with_data_free_mask",
    "mask_r": "mask_vs_data_similarity_r",
    "mask_r_p": "mask_vs_data_similarity_p",
    "mask_alone": "kept_alone",
}
"""The report's names for `bench.diagnostics.diagnose`'s readings of a run's masks."""
LARGEST_OVER_RUNS = {"mask_r_p"}
"""Readings that are not averaged over a cell's runs: a p-value's mean is no p-value, and the largest
is the claim every seed supports."""


def _readings(directories: list[Path]) -> list[dict[str, Any] | None]:
    """Each run's mask readings (`bench.diagnostics.mask_diagnostics`; None for a run without masks)."""
    from perfit.bench.diagnostics import mask_diagnostics

    return [mask_diagnostics(directory) for directory in directories]


def _masks(readings: list[dict[str, Any] | None]) -> dict[str, float]:
    """The mask readings (MASK_READINGS) averaged over the runs that searched masks (the largest, for
    LARGEST_OVER_RUNS); NaN without one, or where a run has no such reading (read before it existed)."""
    found = [d for d in readings if d]

    def over_runs(name: str, key: str) -> float:
        values = [float(d.get(key, math.nan)) for d in found]
        if not values or any(math.isnan(v) for v in values):
            return math.nan
        return max(values) if name in LARGEST_OVER_RUNS else statistics.fmean(values)

    return {name: over_runs(name, key) for name, key in MASK_READINGS.items()}


def _chosen_tuning_runs(tuning: dict[str, Any] | None) -> list[tuple[Any, dict[str, Any], Path]]:
    """(cell, its tuning.json entry, its seed-0 tuning run at its chosen rate) of every PerFIT cell
    with a chosen rate; none without the tuning's `out` (tuning.json's, from `perfit bench tune`)."""
    from perfit.bench.tuning import tuning_name

    if "out" not in (tuning or {}):
        return []
    chosen = []
    for cell in personalization_grid():
        entry = tuning["cells"].get(cell.name, {})
        if cell.fields.get("method") == "perfit" and "chosen_lr" in entry:
            chosen.append((cell, entry, Path(tuning["out"]) / tuning_name(cell, entry["chosen_lr"]) / "seed0"))
    return chosen


def search_readings(tuning: dict[str, Any] | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Per split, every PerFIT cell's seed-0 tuning run at its chosen rate (the runs the variant is
    chosen on; no held-out row): its validation perplexity and its masks' readings. Cells without a
    chosen rate are left out. Where that run is gone (a transcribed value) but the run whose masks it
    kept (`bench.tuning.masks_run`: the search reads no rate) is here, the masks are read there,
    and `masks_read_on` names it."""
    from perfit.bench.tuning import masks_run

    def unread(masks: dict[str, float]) -> bool:
        return all(math.isnan(v) for v in masks.values())

    readings: dict[str, dict[str, dict[str, Any]]] = {}
    for cell, entry, directory in _chosen_tuning_runs(tuning):
        masks, read_on = _masks(_readings([directory])), None
        source = masks_run(cell, entry["chosen_lr"], tuple(tuning["lrs"])) if tuning.get("lrs") else ""
        if source and unread(masks):
            found = _masks(_readings([Path(tuning["out"]) / source / "seed0"]))
            if not unread(found):
                masks, read_on = found, source
        readings.setdefault(cell.split, {})[cell.label] = {
            "lr": entry["chosen_lr"],
            "validation_ppl": entry["validation_ppl"][f"{entry['chosen_lr']:g}"],
            "transcribed": f"{entry['chosen_lr']:g}" in entry.get("transcribed", ()),  # its run is gone
            **masks,
            **({"masks_read_on": read_on} if read_on else {}),
            "own_over_others": _own_over_others(directory),
        }
    return readings


def cross_targets(tuning: dict[str, Any]) -> list[Path]:
    """The tuning runs `perfit bench cross` should read for the report's claim (about 10 minutes
    each at 2 threads): per split, the paper's PerFIT and the variant chosen on validation, each at
    its chosen rate, where the run is here with its adapters (not a copy from a record, `bench.record`,
    nor gone: a transcribed value) and has no cross.json yet. Does a client's own model fit its rows
    better than the other clients' models do, in the runs the claim compares?"""
    from perfit.bench.record import is_copy

    chosen = chosen_variants(tuning.get("cells"))
    return [
        directory
        for cell, _, directory in _chosen_tuning_runs(tuning)
        if cell.label in ("perfit", chosen[cell.split])
        and (directory / "summary.json").is_file()
        and not is_copy(directory)
        and not (directory / "cross.json").is_file()
    ]


def _own_over_others(run_dir: Path) -> float:
    """The run's cross-evaluation (`perfit bench cross`, its cross.json) of every client's own model
    against the other clients' models on its rows; NaN where it has not been run."""
    path = run_dir / "cross.json"
    return float(json.loads(path.read_text())["mean_own_over_others"]) if path.is_file() else math.nan


def machine_hours(directory: Path | None) -> float:
    """Wall hours of every finished run under `directory` (the sum of their summaries'
    `wall_seconds`), 0 where there is none."""
    if directory is None or not Path(directory).is_dir():
        return 0.0
    from perfit.federation.run_directory import read_summary

    return sum(read_summary(path).get("wall_seconds", 0.0) for path in Path(directory).rglob("summary.json")) / 3600


def summarize(results: dict[str, CellResult], tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per split: every cell's mean perplexity, paired ratio to FIT (and per seed), ROUGE-L and mask
    readings; the chosen variant and the goal's checks for it (None where not yet measurable); every
    PerFIT cell's masks on its tuning run (`search_readings`). `tuning`: a tuning.json's content."""
    out: dict[str, Any] = {"goal": GOAL, "splits": {}, "search_readings": search_readings(tuning)}
    out["transcribed_source"] = (tuning or {}).get("transcribed_source", "")
    chosen = chosen_variants((tuning or {}).get("cells"))
    for split in SPLITS:
        fit = results[f"personal/{split}/fit"]
        baselines = [results[f"personal/{split}/{b}"] for b in PERSONALIZED_BASELINES]
        cells, mask_readings = {}, {}
        for result in results.values():
            if result.cell.split != split or not result.runs:
                continue
            mask_readings[result.cell.label] = dict(
                zip(result.runs, _readings([r["dir"] for r in result.runs.values()]), strict=True)
            )
            cells[result.cell.label] = {
                "seeds": sorted(result.runs),
                "personalized_ppl": result.mean,
                "over_fit": paired_ratio(result, fit),
                "over_fit_per_seed": {str(s): v for s, v in _per_seed(result, fit).items()},
                "rouge_l": _rouge(result),
                "degraded_seeds": result.degraded_seeds,
                "against_fit": _against_fit(result, fit),
                **_masks(list(mask_readings[result.cell.label].values())),
            }
        variant = chosen[split]
        split_out: dict[str, Any] = {"cells": cells, "chosen_variant": variant, "goal_met": None}
        if variant is not None:
            split_out.update(
                _goal(results[f"personal/{split}/{variant}"], fit, baselines, mask_readings.get(variant, {}))
            )
        out["splits"][split] = split_out
    out["goal_met"] = _both_splits(out["splits"])
    return out


def _both_splits(splits: dict[str, dict[str, Any]]) -> bool | None:
    """The goal over both splits: one method (`chosen_variants` picks one for both) that meets it in
    each. False as soon as a split fails, or (a guard: `chosen_variants` names one) where the splits'
    variants differ; None while a split is not yet measurable."""
    verdicts = [found["goal_met"] for found in splits.values()]
    variants = {found["chosen_variant"] for found in splits.values()}
    if False in verdicts or (None not in variants and len(variants) > 1):
        return False
    return None if None in verdicts else True


def _goal(
    method: CellResult, fit: CellResult, baselines: list[CellResult], masks: dict[int, dict[str, Any] | None]
) -> dict[str, Any]:
    """The goal's checks for `method`, seed by seed over every held-out seed. Not measurable (goal_met
    None, the missing seeds named) until the method, FIT and every personalized baseline have
    finished all of them: a run not there could be the one that fails. At each seed the strongest
    baseline is the one the method beats least there; a NaN (a diverged run, a reading not made)
    fails its check. `masks`: the method's mask readings by seed, as `summarize` read them."""
    compared = (method, fit, *baselines)
    missing = {r.cell.label: sorted(set(HELD_OUT_SEEDS) - set(r.runs)) for r in compared}
    missing = {label: seeds for label, seeds in missing.items() if seeds}
    if missing:
        return {"missing_seeds": missing, "checks": None, "goal_met": None}
    seeds = HELD_OUT_SEEDS
    over_fit = {s: method.ppl[s] / fit.ppl[s] for s in seeds}  # a diverged run's perplexity reads as NaN
    per_baseline = [[method.ppl[s] / b.ppl[s] for b in baselines] for s in seeds]
    worst = {s: max(r) if all(map(math.isfinite, r)) else math.nan for s, r in zip(seeds, per_baseline, strict=True)}

    def rouge(result: CellResult, seed: int) -> float:
        return float(result.runs[seed]["summary"].get("rouge_l", math.nan))

    def mask_r(seed: int) -> float:
        reading = masks.get(seed)
        return reading["mask_vs_data_similarity_r"] if reading else math.nan

    checks = {
        "over_fit_every_seed": all(v <= GOAL["over_fit"] for v in over_fit.values()),
        "over_best_baseline_every_seed": all(v <= GOAL["over_best_baseline"] for v in worst.values()),
        "rouge_l_not_below_fit": all(rouge(method, s) >= rouge(fit, s) for s in seeds),  # NaN compares False
        "masks_follow_data": all(mask_r(s) >= GOAL["mask_r"] for s in seeds),
        # every compared run counted every client it sampled (`CellResult.degraded_seeds`)
        "no_rejected_updates": not any(r.degraded_seeds for r in compared),
        # a claim needs the paired changes beyond their seed spread, against FIT and the best baseline
        "beyond_seed_spread": all(
            changes_beyond_spread([ratios[s] - 1 for s in seeds]) and all(ratios[s] < 1 for s in seeds)
            for ratios in (over_fit, worst)
        ),
    }
    return {
        "over_best_baseline_per_seed": {str(s): v for s, v in worst.items()},
        "checks": checks,
        "goal_met": all(checks.values()),
    }


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "–"


def markdown(summary: dict[str, Any], runs: Path) -> list[str]:
    """The report's section: one table per split and the goal's verdict, said plainly."""
    lines = [
        HEADING,
        "",
        f"The personalization grid (`perfit bench paper --grid personal --out {runs}`): the `medium` preset, "
        "each client holding a client's share of the paper's 100-client split (120 train / 30 held-out "
        "rows), 10 clients, 3 a round, 10 rounds, batch 64; every method at its rate chosen on seed 0's "
        "validation slice; held-out seeds 1-3, each ratio paired by seed. ROUGE-L: greedy answers to 6 "
        "held-out rows per client. r: correlation of mask overlap with category overlap over client pairs; "
        "r's p: how often relabelling the clients gives an r at least as high (one-sided Mantel test, "
        "`core.diagnostics.pair_correlation_p`; the largest over a cell's seeds; where many relabellings "
        "leave the clients' category overlaps as they are, it cannot be small). "
        "kept alone: the share of a client's kept positions no other client keeps (Eq. 6 averages every "
        "other value over the clients keeping it).",
        "",
    ]
    for split, found in summary["splits"].items():
        lines += [f"### {split}", "", *_held_out_table(found), *_against_fit_lines(found)]
        lines += _search_table(summary["search_readings"].get(split, {}), summary.get("transcribed_source", ""))
        lines += _verdict(found)
    overall = {True: "**met**", False: "**not met**", None: "not measurable yet"}[summary.get("goal_met")]
    lines += [f"The goal over both splits (one PerFIT method, chosen for both on validation): {overall}.", ""]
    return lines


def _held_out_table(found: dict[str, Any]) -> list[str]:
    """A split's held-out table: every cell's seeds, perplexity, ratio to FIT, ROUGE-L, mask readings."""
    lines = [
        "| method | seeds | pers. ppl | / FIT | ROUGE-L | mask overlap | with data-free mask | mask r "
        "| r's p | kept alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, cell in found["cells"].items():
        marker = " (chosen on validation)" if label == found["chosen_variant"] else ""
        seeds = ",".join(map(str, cell["seeds"]))
        numbers = [_number(cell["personalized_ppl"]), _number(cell["over_fit"], 4), _number(cell["rouge_l"])]
        lines.append(f"| {label}{marker} | {seeds} | " + " | ".join(numbers) + f" | {_mask_numbers(cell)} |")
    return [*lines, ""]


def _against_fit_lines(found: dict[str, Any]) -> list[str]:
    """The cells with every held-out seed against FIT's same seeds: what the seeds let us say."""
    compared = {label: cell["against_fit"] for label, cell in found["cells"].items() if cell.get("against_fit")}
    if not compared:
        return []
    seeds = "/".join(map(str, HELD_OUT_SEEDS))
    lines = [
        f"Against FIT at seeds {seeds}, paired by seed (a difference is named only where every seed agrees "
        "and the mean change exceeds the seeds' sample standard deviation):",
        "",
    ]
    for label, against in compared.items():
        ratios = " / ".join(f"{r:.3f}x" for r in against["ppl_ratios"])
        rouge = " / ".join(f"{d:+.3f}" for d in against["rouge_l_differences"])
        ppl, answers = against["ppl"], against["rouge_l"]
        ppl += {"lower": " (better)", "higher": " (worse)"}.get(ppl, "")
        answers += {"lower": " (worse)", "higher": " (better)"}.get(answers, "")
        lines.append(f"- `{label}`: perplexity {ratios}, **{ppl}**; ROUGE-L {rouge}, **{answers}**.")
    return [*lines, ""]


def _search_table(searched: dict[str, dict[str, Any]], transcribed_source: str) -> list[str]:
    """A split's PerFIT cells on their seed-0 tuning runs (`search_readings`), with the footnotes on
    values transcribed (†) and masks read on another run (‡); nothing where none is tuned."""
    if not searched:
        return []
    lines = [
        "Every PerFIT cell's masks on its seed-0 tuning run at its chosen rate (the runs the variant "
        "is chosen on). own / others: each client's own model against the other clients' models on "
        "its validation rows, geometric mean over clients (`perfit bench cross`; 1: the masks "
        "personalize nothing a client's data can tell; – not run):",
        "",
        "| PerFIT cell | lr | validation ppl | mask overlap | with data-free mask | mask r | r's p "
        "| kept alone | own / others |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {r['lr']:g} | {_number(r['validation_ppl'])}{'†' if r.get('transcribed') else ''} "
            f"| {_mask_numbers(r, '‡' if r.get('masks_read_on') else '')} "
            f"| {_number(r['own_over_others'], 4)} |"
            for label, r in searched.items()
        ),
        "",
    ]
    if any(r.get("transcribed") for r in searched.values()):
        lines += [f"†: transcribed; the run is gone, with its cross-evaluation and (unless ‡) its masks "
                  f"({transcribed_source}).", ""]  # fmt: skip
    read_on = {label: r["masks_read_on"] for label, r in searched.items() if r.get("masks_read_on")}
    if read_on:
        named = "; ".join(f"{label}: {source}" for label, source in read_on.items())
        lines += [f"‡: the masks read on the tuning run that searched them, which this cell's run kept ({named}).", ""]
    return lines


def _verdict(found: dict[str, Any]) -> list[str]:
    """A split's runs to redo before a claim, and its verdict: no variant yet, runs missing, or the goal's checks."""
    lines = []
    degraded = [f"{label} (seeds {cell['degraded_seeds']})" for label, cell in found["cells"].items()
                if cell["degraded_seeds"]]  # fmt: skip
    if degraded:
        lines += ["Runs that rejected a client's update (a round counted fewer clients) or restarted a node's "
                  "kept values; rerun them before a claim: " + ", ".join(degraded) + ".", ""]  # fmt: skip
    if found["chosen_variant"] is None:
        return [
            *lines,
            "No PerFIT variant chosen yet (FIT's and every variant's tuning on seed 0, in both splits, "
            "is not complete): no claim.",
            "",
        ]
    if found.get("goal_met") is None:
        missing = "; ".join(f"{label} seeds {seeds}" for label, seeds in found["missing_seeds"].items())
        return [*lines, f"Chosen variant `{found['chosen_variant']}`: held-out runs missing ({missing}), no claim.", ""]
    failed = [name for name, ok in found["checks"].items() if not ok]
    verdict = "met" if found["goal_met"] else f"not met ({', '.join(failed)})"
    return [*lines, f"Goal for `{found['chosen_variant']}` ({GOAL}): **{verdict}**.", ""]


def _mask_numbers(reading: dict[str, Any], mark: str = "") -> str:
    """The mask readings' cells, each number with `mark` (‡: read on another run than the cell's own)."""
    digits = {"mask_r": 2, "mask_r_p": 4}  # p's smallest value is 1/10,000: 0.0001, not 0.000
    numbers = [_number(reading[name], digits.get(name, 3)) for name in MASK_READINGS]
    return " | ".join(n + mark if n != "–" else n for n in numbers)


def section(runs: Path, tuning_path: Path | None, figures: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """`summarize` of the runs, the variant chosen by a tuning.json (`perfit bench tune --grid
    personal`), the machine hours spent, and its markdown; with `figures` (the report's figures/
    folder, beside the markdown) the ratios to FIT by seed drawn there as FIGURE."""
    from perfit.bench.figures import figure_over_fit_by_seed

    tuning = json.loads(tuning_path.read_text()) if tuning_path is not None else None
    summary = summarize(load(runs), tuning)
    tuning_runs = Path(tuning["out"]) / "personal" if tuning and "out" in tuning else None
    summary["machine_hours"] = {"held_out": machine_hours(runs / "personal"), "tuning": machine_hours(tuning_runs)}
    hours = summary["machine_hours"]
    lines = markdown(summary, runs)
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        if figure_over_fit_by_seed(summary["splits"], figures / FIGURE):
            lines += [f"![each method's personalized perplexity over FIT's, seed by seed](figures/{FIGURE})", ""]
    lines += [
        "Run time (the sum of the runs' wall times; runs beside other work take longer, and a run in one of two "
        "lanes on 2 cores longer than a 2-thread run, with two at once): "
        f"{hours['held_out']:.1f} h held-out runs, {hours['tuning']:.1f} h tuning.",
        "",
    ]
    return summary, lines


def splice(document: str, section: list[str]) -> str:
    """`document` (a results.md) with its personalization section (from HEADING to the next `## `
    heading) replaced by `section`; where it has none, `section` goes before the first FOLLOWING
    heading the document has, else at its end. Every other line is kept as it was."""
    lines = document.split("\n")
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next(
            (i for heading in FOLLOWING for i, line in enumerate(lines) if line.startswith(heading)), len(lines)
        )
    return "\n".join(lines[:start] + section + lines[end:])


def write(runs: Path, tuning_path: Path | None, out: Path) -> list[Path]:
    """The section where the paper grid's runs are not at hand (`perfit report --personal-runs ...`
    without `--runs`): spliced into `out`'s results.md, and results.json's `personal` key, where a
    report of the paper grid is there (the rest of both is kept as it is); else on its own, in
    `personalization.md` and `.json`. Each file is replaced whole, never left half written."""
    from perfit.federation.run_directory import json_safe

    out.mkdir(parents=True, exist_ok=True)
    summary, lines = section(runs, tuning_path, out / "figures")
    markdown_path, json_path = out / "results.md", out / "results.json"
    if markdown_path.is_file() and json_path.is_file():
        document = json.loads(json_path.read_text())
        document["personal"] = json_safe(summary)
        texts = {
            json_path: json.dumps(document, indent=2) + "\n",
            markdown_path: splice(markdown_path.read_text(), lines),
        }
    else:
        markdown_path, json_path = out / "personalization.md", out / "personalization.json"
        texts = {json_path: json.dumps(json_safe(summary), indent=2) + "\n"}
        texts[markdown_path] = "\n".join(["# Personalization", "", *lines])
    for path, text in texts.items():
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text)
        temporary.replace(path)
    figure = out / "figures" / FIGURE
    return [markdown_path, json_path, *([figure] if figure.is_file() else [])]
