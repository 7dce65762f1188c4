"""What the reliability tests share: a tiny PerFIT config and the aggregate the server should reach."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from perfit.client.task import ClientTask
from perfit.config import Config
from perfit.core.aggregate import aggregate, personalize, trimmed_mean
from perfit.core.methods import global_start

from ..tiny import TINY_RUN


def tiny_config(tiny_model: Path, small_data: Path, out: Path, **changes) -> Config:
    fields = {
        **TINY_RUN,
        "num_clients": 4,
        "clients_per_round": 4,
        "rounds": 1,
        "max_samples_per_client": 12,
        "lr": 1e-2,
        "model": str(tiny_model),
        "data": str(small_data),
        "out": str(out),
        "seed": 5,
    }
    return Config(**{**fields, **changes})


def run_masks(out: Path) -> dict[int, torch.Tensor]:
    return {int(k.split("_")[1]): v.bool() for k, v in load_file(str(out / "masks.safetensors")).items()}


def server_global(out: Path) -> torch.Tensor:
    """The global adapter the server saved after its last round."""
    return load_file(str(out / "checkpoint.safetensors"))["global"]


def expected_global(
    config: Config, clients: list[int], masks: dict[int, torch.Tensor], weights: dict[int, float] | None = None
) -> torch.Tensor:
    """Eq. 6 over exactly `clients`' updates in every round (their trimmed mean where `config.trim`),
    computed here without Flower; each weighs its example count, or `weights[client]` where given.
    What the server does to an update out of bounds (its norm bound, its weight cap) is not
    recomputed: a test that compares a round with this one shows that no update was bounded or
    capped. For the methods that share every position they train (FIT, PerFIT), not FedSA-LoRA's
    or HetLoRA's rules."""
    if config.method not in ("fit", "perfit"):
        raise ValueError(f"expected_global recomputes FIT and PerFIT rounds, not {config.method}")
    task = ClientTask(config)
    current = global_start(task.layout, config)
    for round_number in range(1, config.rounds + 1):
        updates = []
        for client in clients:
            result = task.train(client, personalize(current, masks[client]), masks[client], round_number)
            if result.examples:  # as the server does: a client with no loss-carrying rows adds nothing
                weight = (weights or {}).get(client, float(result.examples))
                updates.append((masks[client], result.flat * masks[client], weight))
        if config.trim:
            current = trimmed_mean(current, updates, config.trim)
        else:
            current = aggregate(config.aggregation, current, updates)
    return current


def first_round_values(config: Config, clients: list[int], masks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each client's honest update of round 1 (its values, zeros outside its mask), computed here
    without Flower from the seeded start."""
    task = ClientTask(config)
    start = global_start(task.layout, config)
    return {c: task.train(c, personalize(start, masks[c]), masks[c], 1).flat * masks[c] for c in clients}
