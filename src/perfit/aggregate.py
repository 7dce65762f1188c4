"""Server aggregation: FedAvg and the personalized aggregation of Eq. 6. Pure tensor functions.

Every update is (mask, dense values with zeros outside the mask, weight = number of examples).
"""

from __future__ import annotations

import torch

Update = tuple[torch.Tensor, torch.Tensor, float]


def aggregate_shared(previous: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """Eq. 6, `shared`: each position is the weighted mean over the round's clients that hold it.

    A position held by no participant keeps its previous value. With all-ones masks this is FedAvg.
    """
    weight_sum, value_sum = _weighted_sums(previous, updates)
    covered = weight_sum > 0
    result = previous.clone()
    result[covered] = (value_sum[covered] / weight_sum[covered]).to(previous.dtype)
    return result


def aggregate_literal(previous: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """Eq. 6 read literally: sum_j gamma_j * theta_j with gamma_j = n_j / sum n, zeros where masked.

    Positions held by no participant keep their previous value.
    """
    total_weight = sum(weight for _, _, weight in updates)
    _check(previous, updates, total_weight)
    weighted = sum(weight / total_weight * (values * mask) for mask, values, weight in updates)
    covered = torch.stack([mask for mask, _, _ in updates]).any(0)
    return torch.where(covered, weighted, previous)


def aggregate(mode: str, previous: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    if mode == "shared":
        return aggregate_shared(previous, updates)
    if mode == "literal":
        return aggregate_literal(previous, updates)
    raise ValueError(f"unknown aggregation {mode!r}; use shared or literal")


def personalize(global_flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6 outer mask: the global adapter restricted to one client's positions (zeros elsewhere)."""
    return global_flat * mask


def _weighted_sums(previous: torch.Tensor, updates: list[Update]) -> tuple[torch.Tensor, torch.Tensor]:
    _check(previous, updates, sum(weight for _, _, weight in updates))
    weight_sum = torch.zeros_like(previous, dtype=torch.float64)
    value_sum = torch.zeros_like(previous, dtype=torch.float64)
    for mask, values, weight in updates:
        weight_sum += weight * mask
        value_sum += weight * (values.double() * mask)
    return weight_sum, value_sum


def _check(previous: torch.Tensor, updates: list[Update], total_weight: float) -> None:
    if not updates:
        raise ValueError("aggregation needs at least one update")
    if total_weight <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    for mask, values, weight in updates:
        if mask.shape != previous.shape or values.shape != previous.shape:
            raise ValueError(
                f"update shape {tuple(values.shape)} / mask {tuple(mask.shape)} != {tuple(previous.shape)}"
            )
        if weight < 0:
            raise ValueError(f"negative aggregation weight {weight}")
