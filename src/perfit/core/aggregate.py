"""Server aggregation: FedAvg and the personalized aggregation of Eq. 6. Pure tensor functions.

Every update is (mask, dense values with zeros outside the mask, weight = number of examples).
"""

from __future__ import annotations

import torch

Update = tuple[torch.Tensor, torch.Tensor, float]


class Accumulator:
    """Eq. 6 one update at a time, so the server holds one adapter-sized pair of sums however many
    clients a round has (never a list of their updates).

    `shared`: each position is the weighted mean over the clients that hold it (Eq. 6); a position
    held by no participant keeps its previous value. With all-ones masks this is FedAvg.
    `literal`: Eq. 6 read literally, sum_j gamma_j * theta_j with gamma_j = n_j / sum n and zeros
    where masked (HetLoRA's zero-padding aggregation); uncovered positions keep their previous value.
    """

    def __init__(self, mode: str, size: int) -> None:
        if mode not in ("shared", "literal"):
            raise ValueError(f"unknown aggregation {mode!r}; use shared or literal")
        self.mode, self.count, self.total_weight = mode, 0, 0.0
        self.weight_sum = torch.zeros(size, dtype=torch.float64)
        self.value_sum = torch.zeros(size, dtype=torch.float64)
        self.covered = torch.zeros(size, dtype=torch.bool)

    def add(self, mask: torch.Tensor, values: torch.Tensor, weight: float) -> None:
        if mask.shape != self.covered.shape or values.shape != self.covered.shape:
            raise ValueError(
                f"update shape {tuple(values.shape)} / mask {tuple(mask.shape)} != {tuple(self.covered.shape)}"
            )
        if weight < 0:
            raise ValueError(f"negative aggregation weight {weight}")
        self.weight_sum += weight * mask
        self.value_sum += weight * (values.double() * mask)
        self.covered |= mask
        self.total_weight += weight
        self.count += 1

    def result(self, previous: torch.Tensor) -> torch.Tensor:
        if not self.count:
            raise ValueError("aggregation needs at least one update")
        if self.total_weight <= 0:
            raise ValueError("aggregation weights must sum to a positive number")
        if previous.shape != self.covered.shape:
            raise ValueError(f"previous adapter shape {tuple(previous.shape)} != {tuple(self.covered.shape)}")
        if self.mode == "literal":
            return torch.where(self.covered, (self.value_sum / self.total_weight).to(previous.dtype), previous)
        held = self.weight_sum > 0
        result = previous.clone()
        result[held] = (self.value_sum[held] / self.weight_sum[held]).to(previous.dtype)
        return result


def aggregate(mode: str, previous: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """Eq. 6 (`shared` or `literal`, see Accumulator) over a list of updates."""
    accumulator = Accumulator(mode, previous.numel())
    for mask, values, weight in updates:
        accumulator.add(mask, values, weight)
    return accumulator.result(previous)


def aggregate_shared(previous: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """Eq. 6, `shared`: the weighted mean over the clients holding each position."""
    return aggregate("shared", previous, updates)


def aggregate_literal(previous: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """Eq. 6 read literally: weighted sum with zeros where masked (zero-padding)."""
    return aggregate("literal", previous, updates)


def personalize(global_flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6 outer mask: the global adapter restricted to one client's positions (zeros elsewhere)."""
    return global_flat * mask
