"""docs/figures/*.png of `perfit report` (matplotlib, written only for cells that have runs): the
loss curves, the first LoRA module's mask similarity (Fig. 3-4 of the paper) and grouped bars."""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from perfit.bench.experiments import LABELS, SPLIT_TITLES, SPLITS
from perfit.config import from_toml
from perfit.federation.run_directory import MASKS, read_summary

if TYPE_CHECKING:
    from perfit.bench.results import CellResult


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


@functools.cache
def _rows(data: str) -> list[dict[str, str]]:
    """A data file's rows, read once per process: every run of a grid reads the same file."""
    from perfit.client.data import load_rows

    return load_rows(data)


def category_similarity(run_dir: Path, clients: list[int]) -> list[list[float]]:
    """Cosine similarity of the clients' category histograms (their train rows), pairwise."""
    from perfit.core.diagnostics import category_cosines

    rows = _rows(from_toml(run_dir / "config.toml").data)
    partitions = json.loads((run_dir / "partitions.json").read_text())
    return category_cosines([[rows[i]["category"] for i in partitions[str(c)]["train"]] for c in clients])


def first_module_similarity(run_dir: Path) -> tuple[list[list[float]], list[int]] | None:
    """Pairwise Hamming similarity of the clients' masks over the first LoRA module (A and B of
    layer 0's q_proj), from a PerFIT run's masks.safetensors."""
    from safetensors.torch import load_file

    from perfit.artifacts.lora import layout_for
    from perfit.core.masks import hamming_similarity

    masks_file = run_dir / MASKS
    if not masks_file.is_file():
        return None
    summary = read_summary(run_dir / "summary.json")
    config = from_toml(run_dir / "config.toml")
    layout = layout_for(summary["model"], config.dense_rank, config.alpha_value)
    start, end = layout.slots[0].start, layout.slots[1].end
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


def bar_figure(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> bool:
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


def figure_over_fit_by_seed(splits: dict[str, dict], path: Path, goal: float) -> bool:
    """The personalization grid, one panel a split: each method's personalized perplexity over FIT's
    at the same held-out seed, one dot a seed, against FIT (1) and the goal a PerFIT variant is held
    to (`goal` x FIT). `splits`: the report's `personal.summarize(...)["splits"]`. False (no file)
    while no method has a seed."""
    shown = {
        split: {label: cell["over_fit_per_seed"] for label, cell in found["cells"].items() if label != "fit"}
        for split, found in splits.items()
    }
    shown = {split: cells for split, cells in shown.items() if any(cells.values())}
    if not shown:
        path.unlink(missing_ok=True)
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 4), sharey=True, squeeze=False)
    seeds = sorted({seed for cells in shown.values() for ratios in cells.values() for seed in ratios}, key=int)
    for ax, (split, cells) in zip(axes[0], shown.items(), strict=True):
        for offset, seed in enumerate(seeds):
            shift = (offset - (len(seeds) - 1) / 2) * 0.12  # the seeds side by side at each method
            xs = [i + shift for i, ratios in enumerate(cells.values()) if seed in ratios]
            ys = [ratios[seed] for ratios in cells.values() if seed in ratios]
            ax.scatter(xs, ys, s=28, label=f"seed {seed}", zorder=3)
        ax.axhline(1.0, color="gray", linewidth=1, label="FIT")
        ax.axhline(goal, color="tab:red", linestyle="--", linewidth=1, label=f"PerFIT's goal: {goal:g}x FIT")
        ax.set_xticks(range(len(cells)), list(cells), rotation=30, ha="right")
        ax.set_xlim(-0.5, len(cells) - 0.5)  # each method's seeds centred on its tick, none at an edge
        ax.set_title(SPLIT_TITLES.get(split, split))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("personalized perplexity / FIT's, same seed")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
