"""`perfit report`: docs/results.md, docs/results.json and docs/figures/*.png from the run directories
of `perfit bench paper`. Everything is computed from the runs' summary.json, metrics.jsonl,
config.toml and masks; nothing is typed in by hand."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfit.config import from_toml
from perfit.experiments import GRID_COMMIT, METRIC_COMMIT, SCALE_PRESET, SPLITS, Cell, grid
from perfit.outputs import json_safe, read_summary

SPLIT_TITLES = {"pathological": "pathological (2 of 8 categories)", "dirichlet": "Dirichlet(0.5)"}
LABELS = {
    "fit": "FIT (r=8)",
    "perfit-s0.33": "PerFIT s=0.33 (dense r 12)",
    "perfit-s0.5": "PerFIT s=0.5 (dense r 16)",
    "perfit-s0.66": "PerFIT s=0.66 (dense r 24)",
    "perfit-s0.5-zero-b": "PerFIT s=0.5, train from B=0",
    "perfit-8-12-16": "PerFIT ranks 8/12/16",
    "hetlora-8-12-16": "HetLoRA ranks 8/12/16",
    "local": "local only (r=8)",
    "fit-ft": "FIT + local fine-tuning",
    "fedsa": "FedSA-LoRA (r=8)",
}
PERSONALIZED_BASELINES = ("local", "fit-ft", "fedsa")


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


def load_results(runs: Path) -> dict[str, CellResult]:
    """Every grid cell with the seeds that finished (a summary.json in its run directory)."""
    results = {}
    for cell in grid():
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
    """Whether `a` differs from `b` beyond the seed spread, paired by seed: two or more common seeds,
    every per-seed change of the same sign, and |mean change| > the sample std of the changes."""
    changes = paired_changes(a, b)
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
    """`result` over the strongest baseline: the largest of its paired ratios to each (nan if none)."""
    against = [paired_ratio(result, b) for b in baselines] if result is not None else []
    against = [v for v in against if math.isfinite(v)]
    return max(against) if against else math.nan


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


# ---- figures (matplotlib, written only for cells that have runs) ----
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_loss_curves(results: dict[str, CellResult], path: Path) -> bool:
    plt = _plt()
    labels = [
        "table1/{split}/fit",
        "table1/{split}/perfit-s0.5",
        "table1/{split}/perfit-s0.5-zero-b",
        "table2/{split}/hetlora-8-12-16",
        "table2/{split}/perfit-8-12-16",
        "baselines/{split}/fedsa",
    ]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = False
    for ax, split in zip(axes, SPLITS, strict=True):
        present = [results[name.replace("{split}", split)] for name in labels]
        present = [r for r in present if r.runs]
        # the same seeds for every curve of a panel: seeds move the loss more than methods do
        common = sorted(set.intersection(*(set(r.runs) for r in present))) if present else []
        if not common and present:
            common = [0]
            present = [r for r in present if 0 in r.runs]
        for result in present:
            curves = [[m["train_loss"] for m in result.runs[s]["metrics"] if not m.get("final")] for s in common]
            rounds = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(rounds)]
            ax.plot(range(1, rounds + 1), mean, marker="o", label=LABELS[result.cell.label])
            drawn = True
        seeds = f" (seed{'s' if len(common) > 1 else ''} {', '.join(map(str, common))})" if present else ""
        ax.set_title(SPLIT_TITLES[split] + seeds)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("train loss (NLL per target token, sampled clients)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Local training loss per round (mean over the seeds every curve of a panel has)")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; nan when either side is constant."""
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return statistics.correlation(xs, ys)


def category_similarity(run_dir: Path, clients: list[int]) -> list[list[float]]:
    """Cosine similarity of the clients' category histograms (their train rows), pairwise."""
    from perfit.data import load_rows

    rows = load_rows(from_toml(run_dir / "config.toml").data)
    partitions = json.loads((run_dir / "partitions.json").read_text())
    categories = sorted({r["category"] for r in rows})
    hist = {}
    for client in clients:
        counts = [0.0] * len(categories)
        for index in partitions[str(client)]["train"]:
            counts[categories.index(rows[index]["category"])] += 1
        norm = math.sqrt(sum(c * c for c in counts)) or 1.0
        hist[client] = [c / norm for c in counts]
    return [[sum(x * y for x, y in zip(hist[a], hist[b], strict=True)) for b in clients] for a in clients]


def first_module_similarity(run_dir: Path) -> tuple[list[list[float]], list[int]] | None:
    """Pairwise Hamming similarity of the clients' masks over the first LoRA module (A and B of
    layer 0's q_proj), from a PerFIT run's masks.safetensors."""
    from safetensors.torch import load_file

    from perfit.masks import hamming_similarity
    from perfit.model import layout_for

    masks_file = run_dir / "masks.safetensors"
    if not masks_file.is_file():
        return None
    summary = read_summary(run_dir / "summary.json")
    config = from_toml(run_dir / "config.toml")
    layout = layout_for(summary["model"], config.dense_rank, config.alpha_value)
    start, end = layout.tensors[0].start, layout.tensors[1].end
    masks = {int(k.split("_")[1]): v.bool()[start:end] for k, v in load_file(str(masks_file)).items()}
    clients = sorted(masks)
    matrix = [[hamming_similarity(masks[a], masks[b]) for b in clients] for a in clients]
    return matrix, clients


def figure_mask_similarity(results: dict[str, CellResult], path: Path) -> dict[str, tuple[float, float]] | None:
    """The heatmaps; per split (mean pairwise similarity, correlation of similarity with data overlap)."""
    plt = _plt()
    matrices = {}
    for split in SPLITS:
        result = results[f"table1/{split}/perfit-s0.5"]
        if 0 in result.runs:
            found = first_module_similarity(result.runs[0]["dir"])
            if found:
                matrices[split] = found
    if not matrices:
        return None
    fig, axes = plt.subplots(1, len(matrices), figsize=(max(6.5 * len(matrices), 8), 5))
    axes = axes if len(matrices) > 1 else [axes]
    stats = {}
    for ax, (split, (matrix, clients)) in zip(axes, matrices.items(), strict=True):
        data = category_similarity(results[f"table1/{split}/perfit-s0.5"].runs[0]["dir"], clients)
        pairs = [(i, j) for i in range(len(clients)) for j in range(i + 1, len(clients))]
        mean = statistics.fmean(matrix[i][j] for i, j in pairs)
        correlation = pearson([data[i][j] for i, j in pairs], [matrix[i][j] for i, j in pairs])
        stats[split] = (mean, correlation)
        image = ax.imshow(matrix, vmin=0.5, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(clients)), clients)
        ax.set_yticks(range(len(clients)), clients)
        ax.set_xlabel("client")
        ax.set_ylabel("client")
        ax.set_title(f"{SPLIT_TITLES[split]}\nmean {mean:.3f}; r(category overlap, mask) = {correlation:.2f}")
        fig.colorbar(image, ax=ax, label="1 - normalised Hamming distance")
    fig.suptitle(
        "Mask similarity of the first LoRA module (layer 0 q_proj, A and B)\nPerFIT dense rank 16, s=0.5, seed 0"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return stats


def _bar_figure(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> bool:
    """Grouped bars: groups[x label][series] = value."""
    plt = _plt()
    series = list(dict.fromkeys(s for values in groups.values() for s in values))  # in the order given
    if not any(len(values) >= 2 for values in groups.values()):  # nothing to compare yet
        path.unlink(missing_ok=True)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for index, name in enumerate(series):
        xs = [i + index * width for i in range(len(groups))]
        ys = [groups[g].get(name, math.nan) for g in groups]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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


def _search_seconds(result: CellResult, seed: int = 0) -> str:
    run = result.runs.get(seed)
    return f"{run['summary'].get('search_seconds', 0.0):.0f} s" if run else ""


def _tuning_section(out: Path, lr: str) -> list[str]:
    """The learning rates `perfit bench tune` chose (docs/tuning.json beside the report), if any."""
    from perfit.tuning import tuning_table

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


def _number(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}{unit}" if unit else f"{value:.3f}"


def write_report(runs: Path, out: Path, tuned_runs: Path | None = None) -> list[Path]:
    from perfit.speed import cpu_description
    from perfit.train import cpu_has_bf16

    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs}: no grid directory; run `perfit bench paper --out {runs}` first")
    results = load_results(runs)
    finished = sum(len(r.runs) for r in results.values())
    if not finished:
        raise FileNotFoundError(f"{runs}: no finished run yet; run `perfit bench paper --out {runs}`")
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    head = headline(results)
    drawn = {
        "loss": figure_loss_curves(results, figures / "loss_curves.png"),
        "similarity": figure_mask_similarity(results, figures / "mask_similarity.png"),
    }
    part = participation(results)
    drawn["participation"] = _bar_figure(
        figures / "participation.png",
        "Participation per round, 20 clients, Dirichlet(0.5), seed 0",
        part,
        "personalized perplexity (lower is better)",
    )
    comparison = metrics_comparison(results)
    drawn["metric"] = _bar_figure(
        figures / "importance_metric.png",
        "Importance metric (s=0.5, seed 0)",
        {SPLIT_TITLES[s]: {m: v[0] for m, v in c.items()} for s, c in comparison.items()},
        "personalized perplexity (lower is better)",
    )
    written += [
        figures / f
        for f, ok in [
            ("loss_curves.png", drawn["loss"]),
            ("mask_similarity.png", drawn["similarity"]),
            ("participation.png", drawn["participation"]),
            ("importance_metric.png", drawn["metric"]),
        ]
        if ok
    ]
    machine = {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "training dtype": "bf16 autocast (dtype=auto)" if cpu_has_bf16() else "fp32 (dtype=auto)",
    }
    document = {
        "machine": machine,
        "scale_preset": SCALE_PRESET,
        "headline": head,
        "cells": {
            name: {
                "config": {
                    **result.cell.fields,
                    "split": result.cell.split,
                    "preset": SCALE_PRESET,
                    "lr": result.lrs(),
                },
                "seeds": sorted(result.runs),
                "seeds_planned": list(result.cell.seeds),
                "personalized_ppl": {str(s): v for s, v in result.ppl.items()},
                "mean": result.mean if result.runs else None,
                "std": result.std if len(result.runs) > 1 else None,  # one seed measures no spread
                "wall_seconds": {str(s): r["summary"]["wall_seconds"] for s, r in sorted(result.runs.items())},
            }
            for name, result in results.items()
        },
    }
    tuned = tuned_comparison(load_results(tuned_runs), results) if tuned_runs is not None else {}
    if tuned:
        document["tuned"] = {"runs": str(tuned_runs), "cells": tuned}
    (out / "results.json").write_text(json.dumps(json_safe(document), indent=2) + "\n")
    sections = _tuning_section(out, lr_text(results)) + _tuned_section(tuned, tuned_runs)
    text = markdown(results, head, machine, drawn, comparison, part, runs, sections, tuned_runs if tuned else None)
    (out / "results.md").write_text(text)
    return [out / "results.md", out / "results.json", *written]


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
    done = sum(len(r.runs) for r in results.values())
    planned = sum(len(r.cell.seeds) for r in results.values())
    wall = sum(r.wall() for r in results.values())
    lines = [
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
        f"- Code: every grid run is made at commit {GRID_COMMIT} (kept in a worktree while the grid runs, so that"
        " all cells share one algorithm). Its search scores each of the T_p steps on the same micro-batch, in fp32;",
        "  the current search takes the client's micro-batches in turn under the training precision (measured",
        f"  against it in docs/performance.md). The importance-metric cells run at {METRIC_COMMIT}: the same code",
        "  plus the Fisher diagonal from per-example gradients (at the grid's commit it came from one",
        "  micro-batch's gradient, F = g^2, and the second-order cell reproduced the first-order one exactly).",
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
        "`perfit_zero_b_over_best_baseline` the same over the strongest baseline. The quality bar is <= 0.75",
        "(pathological) and <= 0.78 (Dirichlet) over FIT.",
        "",
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
    lines += ["## Figures", ""]
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
    ablations = [r for n, r in results.items() if n.startswith("ablation/")]
    reference = results["table1/pathological/perfit-s0.5"]
    at_seed_0 = f"{reference.ppl[0]:.3f}" if 0 in reference.runs else "not run yet"
    lines += [
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
    lines += list(tuning)
    lines += ["## Every run", "", _table(rows, ["cell", "seed", "personalized ppl", "wall", "search (clients)"]), ""]
    return "\n".join(lines)
