"""Bounding hostile but finite updates: each client's change from what it received is scaled down to
at most a multiple of the round's median change norm, and its aggregation weight (its example
count, which only the client can know) is capped at that multiple of the median client's train
rows, before Eq. 6 averages it in. Pure functions on the values a client received and returned (its
mask positions, in flat order) and on the row counts the clients registered."""

from __future__ import annotations

import math
import statistics

import torch


def change_norms(received: list[torch.Tensor], returned: list[torch.Tensor]) -> list[float]:
    """||returned_j - received_j||_2 of every update (in float64)."""
    return [float((new.double() - old.double()).norm()) for old, new in zip(received, returned, strict=True)]


def median(values: list[float]) -> float:
    """The median (the mean of the two middle values of an even count): while fewer than half the
    values are hostile, the middle ones are honest, so hostile values cannot raise it. (The lower
    median would also hold with one attacker of two, but one honest client that barely moved, as
    a first step from B = 0 moves A, would then bound every other honest client.)"""
    if not values:
        raise ValueError("the median of no values")
    return statistics.median(values)


def bound_changes(
    received: list[torch.Tensor], returned: list[torch.Tensor], multiple: float
) -> tuple[list[torch.Tensor], list[float], float]:
    """(bounded updates, each update's scale, the bound): every change returned_j - received_j
    whose norm exceeds `multiple` x the median of the round's change norms is scaled down to
    that norm (its direction kept); the others are returned as they are (scale 1.0)."""
    norms = change_norms(received, returned)
    bound = multiple * median(norms)
    bounded, scales = [], []
    for old, new, norm in zip(received, returned, norms, strict=True):
        scale = bound / norm if norm > bound else 1.0
        bounded.append(new if scale == 1.0 else (old.double() + scale * (new.double() - old.double())).to(new.dtype))
        scales.append(scale)
    return bounded, scales, bound


def weight_cap(registered_rows: list[int], multiple: float) -> float:
    """The largest aggregation weight (example count) any client's update gets: `multiple` x the
    lower median of the train rows the clients registered (math.inf where `multiple` is 0: no cap).
    Every count is the client's own claim; while fewer than half the clients lie, the lower median
    is an honest client's count, so an owner claiming a huge file weighs at most `multiple` median
    owners instead of the whole round. (The lower median, unlike the change norms' median: with two
    owners the mean of the two counts would let one lie raise the cap as far as it likes.) Clients
    without train rows take no part in an average, nor in its median."""
    training = [rows for rows in registered_rows if rows > 0]
    if multiple <= 0 or not training:
        return math.inf
    return multiple * float(statistics.median_low(training))
