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


def trimmed_mean(previous: torch.Tensor, updates: list[Update], trim: int, chunk: int = 1 << 18) -> torch.Tensor:
    """The trimmed mean alone (`trimmed_mean_and_drops`)."""
    return trimmed_mean_and_drops(previous, updates, trim, chunk)[0]


def trimmed_mean_and_drops(
    previous: torch.Tensor, updates: list[Update], trim: int, chunk: int = 1 << 18
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 (`shared`) made robust by coordinate-wise trimming (Yin et al., 2018, "Byzantine-robust
    distributed learning"): at every position, of the values its holders sent, the `trim` largest
    and the `trim` smallest are left out, with their weights, before the weighted mean. A position
    held by c clients drops min(trim, (c - 1) // 2) at each end, so at least one value is kept (3
    holders and trim 1: their median). The rule and the reason: while a position's hostile
    holders number no more than the values dropped at each end, the result there lies between the
    smallest and the largest honest value, however far and however heavily they pull; the norm
    bound and the weight cap (`core.robust`) only limit how far. With 2 holders (or 1) nothing is
    trimmed: no rule can tell which of two is honest. A position held by no client keeps its
    previous value. Values are ordered by (value, weight), so equal values of unequal weight drop
    the same way whatever order the updates come in (the order replies arrive). Holds every update
    at once (the server's streaming `Accumulator` does not), and works through `chunk` positions
    at a time.

    Returns (the aggregate, how many of each update's positions were left out). An honest client
    is left out where its value happens to be extreme; one that is left out almost everywhere sent
    values far from the others' (the server logs each client's share: `trimmed`)."""
    if trim < 0:
        raise ValueError(f"trim must be >= 0, got {trim}")
    if not updates:
        raise ValueError("aggregation needs at least one update")
    masks = torch.stack([mask.bool() for mask, _, _ in updates])
    if masks.shape[1:] != previous.shape:
        raise ValueError(f"update shape {tuple(masks.shape[1:])} != previous adapter shape {tuple(previous.shape)}")
    weights = torch.tensor([float(weight) for _, _, weight in updates], dtype=torch.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"aggregation weights must be >= 0 and sum to a positive number, got {weights.tolist()}")
    values = torch.stack([v for _, v, _ in updates])
    result = previous.clone()
    ranks = torch.arange(len(updates)).unsqueeze(1)
    by_weight = weights.argsort(stable=True)  # ties in value then go in order of weight
    drops = torch.zeros(len(updates), dtype=torch.int64)
    for start in range(0, previous.numel(), chunk):
        held, value = masks[:, start : start + chunk], values[:, start : start + chunk].double()
        count = held.sum(0)
        keyed = torch.where(held, value, torch.inf)[by_weight]  # holders first, ascending
        order = by_weight[keyed.argsort(dim=0, stable=True)]
        rank = torch.empty_like(order).scatter_(0, order, ranks.expand_as(order))
        dropped = torch.clamp(torch.div(count - 1, 2, rounding_mode="floor"), min=0).clamp(max=trim)
        kept = held & (rank >= dropped) & (rank < count - dropped)
        drops += (held & ~kept).sum(1)
        weight = (weights.unsqueeze(1) * kept).sum(0)
        mean = (weights.unsqueeze(1) * kept * value).sum(0) / weight.clamp(min=1e-300)
        covered = weight > 0
        result[start : start + chunk][covered] = mean[covered].to(previous.dtype)
    return result, drops


class TrimmedMean:
    """`trimmed_mean` behind the Accumulator's interface (`add`, `count`, `result`), for the server's
    round: it keeps each update until the round's result is asked for; then `dropped_shares` holds,
    in the order the updates were added, the share of each one's positions that was left out."""

    def __init__(self, size: int, trim: int) -> None:
        self.size, self.trim, self.updates = size, trim, []
        self.dropped_shares: list[float] = []

    @property
    def count(self) -> int:
        return len(self.updates)

    def add(self, mask: torch.Tensor, values: torch.Tensor, weight: float) -> None:
        if mask.shape != (self.size,) or values.shape != (self.size,):
            raise ValueError(f"update shape {tuple(values.shape)} / mask {tuple(mask.shape)} != ({self.size},)")
        if weight < 0:
            raise ValueError(f"negative aggregation weight {weight}")
        self.updates.append((mask.bool(), values * mask, float(weight)))

    def result(self, previous: torch.Tensor) -> torch.Tensor:
        result, drops = trimmed_mean_and_drops(previous, self.updates, self.trim)
        held = [max(int(mask.sum()), 1) for mask, _, _ in self.updates]
        self.dropped_shares = [int(d) / h for d, h in zip(drops, held, strict=True)]
        return result


def round_aggregator(mode: str, size: int, trim: int = 0) -> Accumulator | TrimmedMean:
    """The server's aggregation of one round: Eq. 6 streamed (`Accumulator`), or with `trim` > 0 its
    coordinate-wise trimmed mean (`shared` only: zero-padding has no per-position holders to trim)."""
    if trim <= 0:
        return Accumulator(mode, size)
    if mode != "shared":
        raise ValueError(f"a trimmed mean needs the shared aggregation, not {mode!r}")
    return TrimmedMean(size, trim)


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
