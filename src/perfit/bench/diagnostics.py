"""Mask diagnostics of a finished PerFIT run, for the report: do the clients' masks follow their data?
The readings are `core.diagnostics`'; this reads a run directory's masks, config and partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perfit.config import from_toml
from perfit.federation.run_directory import read_summary


def mask_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """For a PerFIT run with searched masks: the mean pairwise overlap of the clients' kept positions,
    each mask's mean overlap with the data-free mask (top-k of |theta_0| at the client's budget), and
    the correlation, over client pairs, of mask overlap with data overlap (cosine of the clients'
    category histograms: category overlap under the pathological split, the proportions' cosine under
    Dirichlet). None where the run has no masks file."""
    from safetensors.torch import load_file

    from perfit.artifacts.lora import layout_for
    from perfit.bench.figures import category_similarity
    from perfit.core.diagnostics import data_free_mask, kept_overlap, mean_pairwise_overlap, pair_correlation
    from perfit.core.layout import budget_groups, initial_adapter
    from perfit.core.methods import search_init

    masks_file = Path(run_dir) / "masks.safetensors"
    if not masks_file.is_file():
        return None
    config = from_toml(Path(run_dir) / "config.toml")
    layout = layout_for(read_summary(Path(run_dir) / "summary.json")["model"], config.dense_rank, config.alpha_value)
    masks = {int(k.split("_")[1]): v.bool() for k, v in load_file(str(masks_file)).items()}
    clients = sorted(masks)
    theta = initial_adapter(layout, search_init(config), config.seed)
    budgets = {c: config.client_rank_budget(c) for c in clients}
    free_masks = {b: data_free_mask(theta, budget_groups(layout, config.scope, b)) for b in set(budgets.values())}
    free = [kept_overlap(masks[c], free_masks[budgets[c]]) for c in clients]
    overlap = [[kept_overlap(masks[a], masks[b]) for b in clients] for a in clients]
    data = category_similarity(Path(run_dir), clients) if config.split != "owner" else None
    return {
        "clients": len(clients),
        "mean_pairwise_overlap": mean_pairwise_overlap([masks[c] for c in clients]),
        "overlap_with_data_free_mask": sum(free) / len(free),
        "mask_vs_data_similarity_r": pair_correlation(overlap, data) if data else float("nan"),
    }
