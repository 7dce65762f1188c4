"""The paper grid's results as `perfit report` reads them: each cell's runs (summary.json,
metrics.jsonl, config.toml) and the paired ratios over seeds that the report's tables and headline
quote (`headline`, `participation`, `metrics_comparison`, `tuned_comparison`)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfit.bench.experiments import PERSONALIZED_BASELINES, SPLITS, Cell, grid
from perfit.config import from_toml
from perfit.federation.run_directory import degraded, read_summary


@dataclass
class CellResult:
    cell: Cell
    runs: dict[int, dict[str, Any]]  # seed -> {"summary", "metrics", "dir"}

    @property
    def ppl(self) -> dict[int, float]:
        return {seed: run["summary"]["personalized_ppl"] for seed, run in sorted(self.runs.items())}

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ppl.values()) if self.runs else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed: no spread measured)."""
        values = list(self.ppl.values())
        if len(values) < 2:
            return 0.0
        return statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan  # a diverged seed

    @property
    def degraded_seeds(self) -> list[int]:
        """Seeds whose run rejected a client's update (a round counted fewer clients than it sampled: a
        reply timed out, a client failed) or restarted a node's kept values (`run_directory.degraded`):
        a weaker run than its config says, to rerun before a claim."""
        return [seed for seed, run in sorted(self.runs.items()) if degraded(run["summary"])]

    @property
    def complete(self) -> bool:
        return set(self.runs) == set(self.cell.seeds)

    def wall(self) -> float:
        return sum(run["summary"]["wall_seconds"] for run in self.runs.values())

    def lrs(self) -> list[float]:
        """The learning rates its finished runs used (their config.toml)."""
        return sorted({run["config"].lr for run in self.runs.values()})


def lr_text(results: dict[str, CellResult]) -> str:
    """The learning rate(s) of every finished run, as the report states them."""
    lrs = sorted({lr for result in results.values() for lr in result.lrs()})
    return " / ".join(f"{lr:g}" for lr in lrs) if lrs else "none finished"


def load_results(runs: Path, cells: list[Cell] | None = None) -> dict[str, CellResult]:
    """Every cell (of the paper grid, by default) with the seeds that finished (a summary.json in its
    run directory)."""
    results = {}
    for cell in grid() if cells is None else cells:
        found = {}
        for seed in cell.seeds:
            directory = cell.run_dir(runs, seed)
            if (directory / "summary.json").is_file():
                metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
                found[seed] = {
                    "summary": read_summary(directory / "summary.json"),
                    "config": from_toml(directory / "config.toml"),
                    "metrics": metrics,
                    "dir": directory,
                }
        results[cell.name] = CellResult(cell, found)
    return results


def paired_changes(a: CellResult, b: CellResult) -> list[float]:
    """Relative change of `a` against `b` per seed both finished. A seed fixes the partition, the
    sampling and the start for every method, so the seeds pair the runs; the seeds themselves move
    perplexity far more than the methods do (other clients, other held-out rows)."""
    return [a.ppl[seed] / b.ppl[seed] - 1 for seed in sorted(set(a.runs) & set(b.runs))]


def exceeds_spread(a: CellResult, b: CellResult) -> bool:
    """Whether `a` differs from `b` beyond the seed spread, paired by seed (`changes_beyond_spread`)."""
    return changes_beyond_spread(paired_changes(a, b))


def changes_beyond_spread(changes: list[float]) -> bool:
    """Whether paired per-seed changes agree beyond their spread: two or more, every one of the same
    sign (a NaN agrees with none), and |mean change| > the sample std of the changes."""
    if len(changes) < 2 or not (all(c > 0 for c in changes) or all(c < 0 for c in changes)):
        return False
    return abs(statistics.fmean(changes)) > statistics.stdev(changes)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and math.isfinite(denominator) else math.nan


def paired_ratio(a: CellResult, b: CellResult) -> float:
    """mean(a) / mean(b) over the seeds both finished (nan without one): a cell with one seed done is
    never compared with another cell's mean over two, since seeds move perplexity more than methods."""
    common = sorted(set(a.runs) & set(b.runs))
    if not common:
        return math.nan
    return ratio(statistics.fmean(a.ppl[s] for s in common), statistics.fmean(b.ppl[s] for s in common))


def _lowest(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.nan


def headline(results: dict[str, CellResult]) -> dict[str, dict[str, float]]:
    """Per split, each over the seeds the two cells share: PerFIT (best sparsity) / FIT, hetero PerFIT /
    FIT, best PerFIT / the strongest personalized baseline (the largest of its ratios to each), and
    PerFIT from B = 0 / FIT and / the strongest baseline."""
    out: dict[str, dict[str, float]] = {
        "perfit_over_fit": {},
        "hetero_over_fit": {},
        "perfit_over_best_baseline": {},
        "perfit_zero_b_over_fit": {},
        "perfit_zero_b_over_best_baseline": {},
    }
    for split in SPLITS:
        fit = results[f"table1/{split}/fit"]
        perfits = [results[f"table1/{split}/perfit-s{s}"] for s in (0.33, 0.5, 0.66)]
        by_ratio = {r.cell.name: paired_ratio(r, fit) for r in perfits}
        out["perfit_over_fit"][split] = _lowest(list(by_ratio.values()))
        finite = [r for r in perfits if math.isfinite(by_ratio[r.cell.name])]
        best = min(finite, key=lambda r: by_ratio[r.cell.name]) if finite else None
        baselines = [results[f"baselines/{split}/{b}"] for b in PERSONALIZED_BASELINES]
        zero_b = results[f"table1/{split}/perfit-s0.5-zero-b"]
        out["perfit_over_best_baseline"][split] = _over_strongest(best, baselines)
        out["hetero_over_fit"][split] = paired_ratio(results[f"table2/{split}/perfit-8-12-16"], fit)
        out["perfit_zero_b_over_fit"][split] = paired_ratio(zero_b, fit)
        out["perfit_zero_b_over_best_baseline"][split] = _over_strongest(zero_b, baselines)
    return out


def _over_strongest(result: CellResult | None, baselines: list[CellResult]) -> float:
    """`result` over the strongest baseline: the largest of its paired ratios to each. nan while a
    baseline shares no finished seed with `result` (it could be the strongest); a baseline that
    diverged (no finite ratio) is not the strongest."""
    if result is None or any(not set(result.runs) & set(b.runs) for b in baselines):
        return math.nan
    against = [v for v in (paired_ratio(result, b) for b in baselines) if math.isfinite(v)]
    return max(against) if against else math.nan


def participation(results: dict[str, CellResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for share in (5, 10, 20):
        for method in ("fit", "perfit"):
            result = results[f"participation/dirichlet/{method}-p{share}"]
            if result.runs:
                out.setdefault(f"{share} % per round", {})[method.upper().replace("PERFIT", "PerFIT")] = result.mean
    return out


def metrics_comparison(results: dict[str, CellResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """split -> metric -> (personalized ppl, search seconds per client)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for split in SPLITS:
        names = {
            "first": f"table1/{split}/perfit-s0.5",
            "second": f"metric/{split}/perfit-second",
            "mixed": f"metric/{split}/perfit-mixed",
        }
        for metric, name in names.items():
            result = results[name]
            if 0 in result.runs:
                summary = result.runs[0]["summary"]
                per_client = summary.get("search_seconds", math.nan) / max(len(summary["per_client_ppl"]), 1)
                out.setdefault(split, {})[metric] = (summary["personalized_ppl"], per_client)
    return out


def tuned_comparison(tuned: dict[str, CellResult], results: dict[str, CellResult]) -> dict[str, dict[str, Any]]:
    """Per cell run at its tuned rate (`perfit bench paper --tuned`): its rate, perplexity per seed,
    and two paired ratios: over FIT of the same split at FIT's tuned rate, and over the same cell at
    the grid's rate (both over the seeds the two finished; nan without one)."""
    table = {}
    for name, result in tuned.items():
        if not result.runs:
            continue
        fit = tuned.get(f"table1/{result.cell.split}/fit")
        grid_rate = results.get(name)
        table[name] = {
            "lr": result.lrs(),
            "personalized_ppl": {str(s): v for s, v in result.ppl.items()},
            "over_fit_tuned": paired_ratio(result, fit) if fit is not None else math.nan,
            "over_grid_rate": paired_ratio(result, grid_rate) if grid_rate is not None else math.nan,
        }
    return table
