"""Mask diagnostics: do the clients' masks follow their data? The readings are `core.diagnostics`';
this reads them for a finished PerFIT run (`mask_diagnostics`, for the report), or runs only the
clients' searches under a config and reads their masks (`search_diagnostics`, `perfit bench masks`:
minutes, not a federation, to compare search variants before spending a grid on them)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from perfit.config import Config, from_toml
from perfit.core.layout import Layout
from perfit.federation.run_directory import MASKS, read_summary


def diagnose(
    masks: dict[int, torch.Tensor], config: Config, layout: Layout, data_similarity: list[list[float]] | None
) -> dict[str, Any]:
    """The mean pairwise overlap of the clients' kept positions, each mask's mean overlap with the
    data-free mask (top-k of |theta_0| at the client's budget), and the correlation, over client
    pairs, of mask overlap with data similarity, with its permutation p-value (rows and columns in
    sorted client order; None where the split gives no measure of it: NaN); and how many clients share each
    of a client's kept positions (`core.diagnostics.position_sharing`)."""
    from perfit.core.diagnostics import (
        data_free_mask,
        kept_overlap,
        mean_pairwise_overlap,
        pair_correlation,
        pair_correlation_p,
        position_sharing,
    )
    from perfit.core.layout import budget_groups, initial_adapter
    from perfit.core.methods import search_init

    clients = sorted(masks)
    theta = initial_adapter(layout, search_init(config), config.seed)
    budgets = {c: config.client_rank_budget(c) for c in clients}
    free_masks = {b: data_free_mask(theta, budget_groups(layout, config.scope, b)) for b in set(budgets.values())}
    free = [kept_overlap(masks[c], free_masks[budgets[c]]) for c in clients]
    overlap = [[kept_overlap(masks[a], masks[b]) for b in clients] for a in clients]
    sharers, alone = position_sharing([masks[c] for c in clients])
    return {
        "clients": len(clients),
        "mean_pairwise_overlap": mean_pairwise_overlap([masks[c] for c in clients]),
        "overlap_with_data_free_mask": sum(free) / len(free),
        "mask_vs_data_similarity_r": pair_correlation(overlap, data_similarity) if data_similarity else float("nan"),
        "mask_vs_data_similarity_p": pair_correlation_p(overlap, data_similarity) if data_similarity else float("nan"),
        "mean_sharers": sharers,
        "kept_alone": alone,
    }


MASK_READINGS_FILE = "masks.json"
"""A finished PerFIT run's `mask_diagnostics`, written beside its masks (`keep_mask_readings`): the
readings outlive the masks file, which a grid's record does not keep (megabytes; `bench.record`)."""


READING_KEYS = frozenset(
    ("clients", "mean_pairwise_overlap", "overlap_with_data_free_mask", "mask_vs_data_similarity_r",
     "mask_vs_data_similarity_p", "mean_sharers", "kept_alone")
)  # fmt: skip
"""What `diagnose` reads: a readings file without one of them was written by an older perfit."""


def keep_mask_readings(run_dir: Path) -> bool:
    """Write a finished run's mask readings to MASK_READINGS_FILE once, and again where they lack a
    reading perfit has gained since and the masks are still there; False where it has no masks."""
    path = Path(run_dir) / MASK_READINGS_FILE
    current = path.is_file() and json.loads(path.read_text()).keys() >= READING_KEYS
    if current or not (Path(run_dir) / MASKS).is_file():
        return path.is_file()
    write_reading(path, mask_diagnostics(run_dir))
    return True


def write_reading(path: Path, reading: dict[str, Any]) -> None:
    """A reading of a finished run as JSON (NaN and inf as null), written aside and renamed into place:
    another process never reads half of it, and a write cut short leaves no file that looks done."""
    from perfit.federation.run_directory import json_safe

    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(json_safe(reading), indent=2) + "\n")
    os.replace(staging, path)


def mask_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """`diagnose` for a finished PerFIT run with searched masks, data similarity the cosine of the
    clients' category histograms (category overlap under the pathological split, the proportions'
    cosine under Dirichlet). None where the run has no masks file."""
    from safetensors.torch import load_file

    from perfit.artifacts.lora import layout_for
    from perfit.bench.figures import category_similarity

    masks_file = Path(run_dir) / MASKS
    if not masks_file.is_file():  # a run put back from a record keeps its readings, not its masks
        readings = Path(run_dir) / MASK_READINGS_FILE
        return json.loads(readings.read_text()) if readings.is_file() else None
    config = from_toml(Path(run_dir) / "config.toml")
    layout = layout_for(read_summary(Path(run_dir) / "summary.json")["model"], config.dense_rank, config.alpha_value)
    masks = {int(k.split("_")[1]): v.bool() for k, v in load_file(str(masks_file)).items()}
    data = category_similarity(Path(run_dir), sorted(masks)) if config.split != "owner" else None
    return diagnose(masks, config, layout, data)


def search_diagnostics(config: Config) -> dict[str, Any]:
    """Run Alg. 1 for every participant of `config` (a research split; its train rows, or under
    `validation=1` the train part of them: never a held-out row) and `diagnose` the masks."""
    from perfit.client.task import ClientTask
    from perfit.core.diagnostics import category_cosines

    if config.split == "owner":
        raise ValueError("search diagnostics need a research split (their data similarity is the categories')")
    task = ClientTask(config)
    started = time.perf_counter()
    masks = {client: task.search(client) for client in config.participants}
    seconds = time.perf_counter() - started
    categories = [[task.rows[i]["category"] for i in task.split_of(client).train] for client in sorted(masks)]
    return {**diagnose(masks, config, task.layout, category_cosines(categories)), "search_seconds": seconds}


def _scored_rows(run: Any, clients: list[int], reading: str) -> Any:
    """A `ClientTask` under a finished run's config (`use.export.open_run`; a research split), with
    each of `clients` checked to have the rows the run scored: partitions.json's `eval`, so a
    reading on another data file is an error, not a silent mismatch."""
    from perfit.client.task import ClientTask

    if run.config.split == "owner":
        raise ValueError(f"{run.path}: {reading} needs a research split (every client's rows on this machine)")
    task = ClientTask(run.config.replace(torch_compile="0"))  # a few evaluation passes: not worth a compile
    for client in clients:
        if list(task.split_of(client).eval) != run.partitions[client]["eval"]:
            raise ValueError(f"{run.path}: client {client}'s rows differ from partitions.json's (data file changed?)")
    return task


def base_evaluation(run_dir: Path) -> dict[str, Any]:
    """The base model, with no adapter, on every client's rows that a finished run scored: how far
    the run's training moved each client from where it started. `run_over_base` is the run's
    personalized perplexity (the mean over the clients it scored) over the base model's on the same
    clients. The base model is the same for every method at a seed and split, so one reading (on
    FIT's run) says how much training gives at all, against which a method's gain over FIT is read.
    Reads no adapter: a run put back from a record (`bench.record`) will do."""
    import math
    import statistics

    from perfit.core.metrics import perplexity
    from perfit.use.export import open_run

    run = open_run(run_dir)
    reported = run.summary.get("per_client_ppl") or {}
    if not reported:
        raise ValueError(f"{run.path}: summary.json has no per-client perplexities (per_client_ppl)")
    clients = sorted(int(client) for client in reported)
    task = _scored_rows(run, clients, "the base model's reading")
    started = time.perf_counter()
    zero = torch.zeros(task.layout.size)  # every LoRA product B A is 0: the base model's outputs
    base = [perplexity(*task.evaluate(client, zero)) for client in clients]
    own = [float(reported[str(client)]) for client in clients]  # a client the run could not score: NaN
    # the clients the run's personalized perplexity counts (the server leaves NaN out, keeps a diverged inf)
    counted = [k for k, value in enumerate(own) if not math.isnan(value)]
    run_mean = statistics.fmean(own[k] for k in counted) if counted else math.nan
    base_mean = statistics.fmean(base[k] for k in counted) if counted else math.nan
    return {
        "run": str(run.path),
        "method": run.config.method,
        "clients": clients,
        "base_ppl": base,
        "run_ppl": own,
        "personalized_base_ppl": base_mean,
        "run_over_base": run_mean / base_mean,  # NaN where no client was scored
        "seconds": time.perf_counter() - started,
    }


def cross_evaluation(run_dir: Path, clients: list[int] | None = None) -> dict[str, Any]:
    """Every client's final model (and the global one) on every client's held-out rows of a finished
    run: the rows the run scored (partitions.json's `eval`; the validation slice of a tuning run), so
    the diagonal is the run's own per-client perplexities, recomputed (`diagonal_max_rel_diff` says
    how closely). `own_over_others` per client and its geometric mean (`core.diagnostics.
    own_model_advantage`) say whether each client's own model fits its data better than the other
    clients' models do; `own_over_global` whether it beats the shared adapter. Research splits only;
    `clients`: a subset to read (the whole matrix costs clients x (clients + 1) evaluations)."""
    import math
    import statistics

    from perfit.artifacts.lora import load_adapter_flat
    from perfit.core.diagnostics import own_model_advantage
    from perfit.core.metrics import perplexity
    from perfit.use.export import open_run

    run = open_run(run_dir)
    clients = sorted(clients if clients is not None else run.clients)
    unknown = sorted(set(clients) - set(run.clients))
    if unknown:
        raise ValueError(f"{run.path}: no adapters of clients {unknown}; its clients: {run.clients}")
    task = _scored_rows(run, clients, "cross-evaluation")
    models = {c: load_adapter_flat(run.adapter_dir(c) / "adapter_model.safetensors", task.layout) for c in clients}
    models["global"] = load_adapter_flat(run.adapter_dir(None) / "adapter_model.safetensors", task.layout)
    started = time.perf_counter()
    ppl = {name: [perplexity(*task.evaluate(j, flat)) for j in clients] for name, flat in models.items()}
    matrix = [ppl[i] for i in clients]
    own = own_model_advantage(matrix)
    reported = run.summary.get("per_client_ppl", {})
    diagonal = [abs(matrix[k][k] / reported[str(c)] - 1) for k, c in enumerate(clients) if str(c) in reported]
    return {
        "run": str(run.path),
        "method": run.config.method,
        "clients": clients,
        "ppl": matrix,
        "global_ppl": ppl["global"],
        "own_over_others": own,
        "mean_own_over_others": statistics.geometric_mean(own),
        "own_over_global": [matrix[k][k] / ppl["global"][k] for k in range(len(clients))],
        "diagonal_max_rel_diff": max(diagonal) if diagonal else math.nan,
        "seconds": time.perf_counter() - started,
    }
