"""Does personalization pay at the paper's data per client? The personalization grid's results
(`perfit bench paper --grid personal`) for the report: per split, every method over the held-out
seeds, paired by seed against FIT and against the strongest baseline that ends with a model per
client, with ROUGE-L and the PerFIT variants' mask diagnostics, and the goal checked seed by seed.
The report's section that shows them is `bench.personal_report`.

The PerFIT variant a claim is made for is the one seed 0's validation slice chose (`perfit bench
tune --grid personal`: one variant for both splits, the lowest geometric mean over the splits of
its validation perplexity over FIT's, each at its own chosen rate; `chosen_variants`); the report
never picks it on the held-out seeds."""

from __future__ import annotations

import json
import math
import random
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
from perfit.bench.personal_goal import GOAL, both_splits, goal_checks, paired_claim, seed_rouge
from perfit.bench.results import (
    CellResult,
    load_results,
    paired_ratio,
)


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


def _per_client_ratios(result: CellResult, other: CellResult) -> list[float]:
    """Each client's personalized perplexity over its perplexity under `other` (FIT, or the paper's
    PerFIT) at the same held-out seed, over the seeds (the clients both runs evaluated; NaN where
    either diverged)."""
    ratios = []
    for seed in HELD_OUT_SEEDS:
        own = result.runs[seed]["summary"].get("per_client_ppl", {})
        theirs = other.runs[seed]["summary"].get("per_client_ppl", {})
        for client in sorted(set(own) & set(theirs), key=int):
            mine, shared = own[client], theirs[client]
            ratios.append(math.nan if mine is None or shared is None else float(mine) / float(shared))
    return ratios


def _residuals(values: list[float], on: list[float]) -> list[float]:
    """`values` less their least-squares line on `on` (with an intercept)."""
    mean_v, mean_o = statistics.fmean(values), statistics.fmean(on)
    squares = sum((o - mean_o) ** 2 for o in on)
    slope = sum((v - mean_v) * (o - mean_o) for v, o in zip(values, on, strict=True)) / squares if squares else 0.0
    return [v - mean_v - slope * (o - mean_o) for v, o in zip(values, on, strict=True)]


def _centred(values: list[float]) -> list[float]:
    """`values` less their mean."""
    mean = statistics.fmean(values)
    return [v - mean for v in values]


def follows(
    method: list[list[float]], reference: list[list[float]], fit: list[list[float]], permutations: int = 9999
) -> dict[str, Any]:
    """Does a method move the same clients, the same way, as a reference does, beyond what FIT's own
    reading of each client explains? Each argument: one list a seed of each client's log perplexity,
    in the same client order (a client not finite in all three is dropped; a seed with fewer than 3
    clients left is skipped). r: Pearson's between the method's and the reference's residuals after
    each is regressed, seed by seed, on FIT's (a partial correlation given FIT: a client FIT serves
    worse than its peers leaves room to both, and would read as agreement in their ratios to FIT);
    p: the share of `permutations` relabellings of the reference's residuals within each seed
    (seeded), the observed one counted, whose r is at least r (one-sided); spread: the standard
    deviation of the method's log ratio to FIT over the reference's, each centred on its seed's mean
    (how far it moves clients, against how far the reference does). NaN where a side has no spread."""
    xs, ys, moved, ref_moved = [], [], [], []
    for m, r, f in zip(method, reference, fit, strict=True):
        kept = [(a, b, c) for a, b, c in zip(m, r, f, strict=True) if all(map(math.isfinite, (a, b, c)))]
        if len(kept) < 3:
            continue
        m_seed, r_seed, f_seed = (list(column) for column in zip(*kept, strict=True))
        xs += _residuals(m_seed, f_seed)
        ys.append(_residuals(r_seed, f_seed))
        moved += _centred([a - c for a, c in zip(m_seed, f_seed, strict=True)])
        ref_moved += _centred([b - c for b, c in zip(r_seed, f_seed, strict=True)])
    norm = math.sqrt(sum(x * x for x in xs) * sum(y * y for seed in ys for y in seed))
    if norm == 0 or statistics.pstdev(ref_moved) == 0:
        return {"r": math.nan, "p": math.nan, "spread": math.nan, "client_seeds": len(xs)}

    def r_of(labelled: list[list[float]]) -> float:  # residuals have mean 0 a seed: r is their cosine
        return sum(x * y for x, y in zip(xs, (y for seed in labelled for y in seed), strict=True)) / norm

    r = r_of(ys)
    shuffle = random.Random(0).shuffle
    shuffled = [list(seed) for seed in ys]
    at_least = 1  # the observed labelling counts
    for _ in range(permutations):
        for seed in shuffled:  # within a seed: its clients' residuals change places, nothing else
            shuffle(seed)
        at_least += r_of(shuffled) >= r - 1e-12
    spread = statistics.pstdev(moved) / statistics.pstdev(ref_moved)
    return {"r": r, "p": at_least / (permutations + 1), "spread": spread, "client_seeds": len(xs)}


def _follows_fit_ft(result: CellResult, fit: CellResult, fit_ft: CellResult) -> dict[str, Any] | None:
    """`follows` against FIT + FT, the most direct fit to each client's own rows: a method that
    personalizes should serve better the clients their own epoch serves better. None until all
    three have every held-out seed, and for FIT and FIT + FT themselves."""
    if result is fit or result is fit_ft:
        return None
    if any(not all(s in r.runs for s in HELD_OUT_SEEDS) for r in (result, fit, fit_ft)):
        return None
    columns: tuple[list[list[float]], ...] = ([], [], [])
    for seed in HELD_OUT_SEEDS:
        readings = [r.runs[seed]["summary"].get("per_client_ppl", {}) for r in (result, fit_ft, fit)]
        clients = sorted(set.intersection(*(set(found) for found in readings)), key=int)
        for column, found in zip(columns, readings, strict=True):
            column.append([_log(found[c]) for c in clients])
    return follows(*columns)


def _log(ppl: float | None) -> float:
    """A perplexity's log; NaN for a diverged one (null, NaN or not positive)."""
    return math.log(ppl) if ppl is not None and ppl > 0 else math.nan


def _against(result: CellResult, other: CellResult) -> dict[str, Any] | None:
    """A cell against `other` (FIT; or the chosen variant against the paper's PerFIT) at every
    held-out seed, paired by seed: the perplexity ratios and ROUGE-L differences, and what each lets
    the report say (`paired_claim`); how many clients, over the seeds, it gives a lower perplexity
    than the other cell does, and the range of their ratios (a mean can hide the owners who lose).
    None until both have every seed."""
    if result is other or not all(s in result.runs and s in other.runs for s in HELD_OUT_SEEDS):
        return None
    ratios = list(_per_seed(result, other).values())  # every held-out seed, in order
    rouge = [seed_rouge(result, s) - seed_rouge(other, s) for s in HELD_OUT_SEEDS]
    clients = _per_client_ratios(result, other)
    finite = [r for r in clients if math.isfinite(r)]
    return {
        "ppl_ratios": ratios,
        "ppl": paired_claim([r - 1 for r in ratios]),
        "rouge_l_differences": rouge,
        "rouge_l": paired_claim(rouge),
        "clients_better": sum(r < 1 for r in clients),
        "client_seeds": len(clients),
        "client_ratio_range": [min(finite), max(finite)] if finite else None,
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
    value = json.loads(path.read_text()).get("mean_own_over_others") if path.is_file() else None
    return math.nan if value is None else float(value)  # null: a reading that came out NaN


def base_model(fit: CellResult) -> dict[str, Any] | None:
    """The base model, with no adapter, on FIT's scored rows at each seed whose FIT run has its reading
    (`perfit bench base`, RUN/base.json): its personalized perplexity and FIT's over it, per seed and
    over them. How much training moves perplexity at all, against which a method's difference from
    FIT is read. None where no seed has the reading."""
    base = {}
    for seed, run in sorted(fit.runs.items()):
        path = run["dir"] / "base.json"
        value = json.loads(path.read_text()).get("personalized_base_ppl") if path.is_file() else None
        if value is not None:  # null: the run scored no client
            base[seed] = float(value)
    if not base:
        return None
    return {
        "seeds": sorted(base),
        "personalized_ppl": statistics.fmean(base.values()),
        "fit_over_base": statistics.fmean(fit.ppl[seed] for seed in base) / statistics.fmean(base.values()),
        "fit_over_base_per_seed": {str(seed): fit.ppl[seed] / value for seed, value in base.items()},
    }


def machine_hours(directory: Path | None) -> float:
    """Wall hours of every finished run under `directory` (the sum of their summaries'
    `wall_seconds`), 0 where there is none."""
    if directory is None or not Path(directory).is_dir():
        return 0.0
    from perfit.federation.run_directory import read_summary

    return sum(read_summary(path).get("wall_seconds", 0.0) for path in Path(directory).rglob("summary.json")) / 3600


def summarize(results: dict[str, CellResult], tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per split: every cell's mean perplexity, paired ratio to FIT (and per seed, and what every
    seed lets the report say against FIT: `_against`), ROUGE-L and mask readings; the chosen
    variant and the goal's checks for it (None where not yet measurable); every PerFIT cell's masks
    on its tuning run (`search_readings`). `tuning`: a tuning.json's content."""
    out: dict[str, Any] = {"goal": GOAL, "splits": {}, "search_readings": search_readings(tuning)}
    out["transcribed_source"] = (tuning or {}).get("transcribed_source", "")
    chosen = chosen_variants((tuning or {}).get("cells"))
    for split in SPLITS:
        fit, fit_ft = results[f"personal/{split}/fit"], results[f"personal/{split}/fit-ft"]
        paper_perfit = results[f"personal/{split}/perfit"]
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
                "against_fit": _against(result, fit),
                "follows_fit_ft": _follows_fit_ft(result, fit, fit_ft),
                **_masks(list(mask_readings[result.cell.label].values())),
            }
        variant = chosen[split]
        split_out: dict[str, Any] = {"cells": cells, "chosen_variant": variant, "goal_met": None}
        split_out["base_model"] = base_model(fit)
        if variant not in (None, "perfit"):  # the search it replaces, at the same seeds
            split_out["variant_over_paper"] = _against(results[f"personal/{split}/{variant}"], paper_perfit)
        if variant is not None:
            split_out.update(
                goal_checks(results[f"personal/{split}/{variant}"], fit, baselines, mask_readings.get(variant, {}))
            )
        out["splits"][split] = split_out
    out["goal_met"] = both_splits(out["splits"])
    return out
