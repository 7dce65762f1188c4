"""The personalization grid's goal (issue 31), checked seed by seed: what a PerFIT method must read
against FIT and the strongest personalized baseline at every held-out seed for the report to say
personalization pays (`GOAL`), the checks once every compared run is in (`goal_checks`), the checks a
clean run already fails before then (`failed_already`), and the verdict over both splits
(`both_splits`). `bench.personal` reads the runs and calls these."""

from __future__ import annotations

import math
from typing import Any

from perfit.bench.experiments import HELD_OUT_SEEDS
from perfit.bench.results import CellResult, changes_beyond_spread

GOAL = {"over_fit": 0.95, "over_best_baseline": 0.97, "mask_r": 0.5}
"""A PerFIT method counts as paying where, at every held-out seed, its personalized perplexity is at
most 0.95x FIT's and 0.97x the strongest baseline's at that seed, its ROUGE-L is no worse than FIT's,
and its masks' similarity follows the clients' data similarity (r at least 0.5); the paired changes
agree beyond their seed spread; and it is one method: the same variant in both splits."""


def seed_rouge(result: CellResult, seed: int) -> float:
    """A run's ROUGE-L at `seed` (NaN where it was not read)."""
    return float(result.runs[seed]["summary"].get("rouge_l", math.nan))


def paired_claim(changes: list[float]) -> str:
    """What paired per-seed changes against FIT or another cell (one per held-out seed: a
    perplexity's relative change, ratio - 1; a ROUGE-L's difference) let the report say: "lower" or
    "higher" where every seed agrees and the mean change exceeds the seeds' sample standard
    deviation (`changes_beyond_spread`), else "within the seed spread"; a NaN (a diverged run, a
    reading not made) allows no claim."""
    if any(math.isnan(c) for c in changes):
        return "diverged or not read at a seed"
    if not changes_beyond_spread(changes):
        return "within the seed spread"
    return "lower" if changes[0] < 0 else "higher"


def goal_checks(
    method: CellResult, fit: CellResult, baselines: list[CellResult], masks: dict[int, dict[str, Any] | None]
) -> dict[str, Any]:
    """The goal's checks for `method`, seed by seed over every held-out seed. Not measurable (goal_met
    None, the missing seeds named) until the method, FIT and every personalized baseline have
    finished all of them: a run not there could be the one that fails; unless a check every seed
    must pass already fails on a clean run that is in (`failed_already`: goal_met False). At each
    seed the strongest baseline is the one the method beats least there; a NaN (a diverged run, a
    reading not made) fails its check. `masks`: the method's mask readings by seed, as
    `bench.personal.summarize` read them."""
    compared = (method, fit, *baselines)
    missing = {r.cell.label: sorted(set(HELD_OUT_SEEDS) - set(r.runs)) for r in compared}
    missing = {label: seeds for label, seeds in missing.items() if seeds}
    if missing:
        failed = failed_already(method, fit, baselines, masks)
        return {"missing_seeds": missing, "checks": None, "failed_at": failed, "goal_met": False if failed else None}
    seeds = HELD_OUT_SEEDS
    over_fit = {s: method.ppl[s] / fit.ppl[s] for s in seeds}  # a diverged run's perplexity reads as NaN
    per_baseline = [[method.ppl[s] / b.ppl[s] for b in baselines] for s in seeds]
    worst = {s: max(r) if all(map(math.isfinite, r)) else math.nan for s, r in zip(seeds, per_baseline, strict=True)}

    checks = {
        "over_fit_every_seed": all(v <= GOAL["over_fit"] for v in over_fit.values()),
        "over_best_baseline_every_seed": all(v <= GOAL["over_best_baseline"] for v in worst.values()),
        # a NaN compares False: a ROUGE-L not read fails the check
        "rouge_l_not_below_fit": all(seed_rouge(method, s) >= seed_rouge(fit, s) for s in seeds),
        "masks_follow_data": all(_mask_r(masks, s) >= GOAL["mask_r"] for s in seeds),
        # every compared run counted every client it sampled (`CellResult.degraded_seeds`)
        "no_rejected_updates": not any(r.degraded_seeds for r in compared),
        # a claim needs the paired changes beyond their seed spread, against FIT and the best baseline
        "beyond_seed_spread": all(
            paired_claim([ratios[s] - 1 for s in seeds]) == "lower" for ratios in (over_fit, worst)
        ),
    }
    return {
        "over_best_baseline_per_seed": {str(s): v for s, v in worst.items()},
        "checks": checks,
        "goal_met": all(checks.values()),
    }


def failed_already(
    method: CellResult, fit: CellResult, baselines: list[CellResult], masks: dict[int, dict[str, Any] | None]
) -> dict[str, list[int]]:
    """The goal's every-seed checks that `method` already fails at a held-out seed whose runs are in,
    whatever the seeds still to run read: check -> the failing seeds. Only a clean, finite reading
    settles a check early; a diverged run (its masks and ROUGE-L too), a reading not made or a
    degraded run (`degraded_seeds`) may be rerun, so it waits for the full verdict. The spread
    check needs every seed, so it waits too."""

    def seeds_of(*results: CellResult) -> list[int]:
        """The seeds every one of `results` finished cleanly: not degraded, not diverged."""
        done = set(HELD_OUT_SEEDS).intersection(*(r.runs for r in results))
        doubtful = {s for r in results for s in r.degraded_seeds} | {
            s for r in results for s in done if not math.isfinite(r.ppl[s])
        }
        return sorted(done - doubtful)

    def failing(values: dict[int, float], limit: float) -> set[int]:
        """The seeds whose value exceeds `limit` (a NaN compares False: it waits)."""
        return {s for s, v in values.items() if v > limit}

    over_fit = {s: method.ppl[s] / fit.ppl[s] for s in seeds_of(method, fit)}
    over_baselines = [{s: method.ppl[s] / b.ppl[s] for s in seeds_of(method, b)} for b in baselines]
    found = {
        "over_fit_every_seed": failing(over_fit, GOAL["over_fit"]),
        # the strongest baseline at a seed is the one the method beats least: any one over the limit fails it
        "over_best_baseline_every_seed": set().union(*(failing(r, GOAL["over_best_baseline"]) for r in over_baselines)),
        "rouge_l_not_below_fit": failing({s: seed_rouge(fit, s) - seed_rouge(method, s) for s in over_fit}, 0.0),
        "masks_follow_data": {s for s in seeds_of(method) if _mask_r(masks, s) < GOAL["mask_r"]},
    }
    return {check: sorted(seeds) for check, seeds in found.items() if seeds}


def _mask_r(masks: dict[int, dict[str, Any] | None], seed: int) -> float:
    """r of the masks' similarity against the clients' data overlap at `seed` (NaN where not read)."""
    reading = masks.get(seed)
    return reading["mask_vs_data_similarity_r"] if reading else math.nan


def both_splits(splits: dict[str, dict[str, Any]]) -> bool | None:
    """The goal over both splits: one method (`chosen_variants` picks one for both) that meets it in
    each. False as soon as a split fails, or (a guard: `chosen_variants` names one) where the splits'
    variants differ; None while a split is not yet measurable."""
    verdicts = [found["goal_met"] for found in splits.values()]
    variants = {found["chosen_variant"] for found in splits.values()}
    if False in verdicts or (None not in variants and len(variants) > 1):
        return False
    return None if None in verdicts else True
