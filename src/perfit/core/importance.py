"""Taylor importance of every LoRA element (paper §4.2, Eq. 2-4), and one score beyond the paper
(`gradient_magnitude`). Pure tensor functions."""

from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T")


def first_order(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 2: |dL/dtheta * theta|, the first-order change of the loss when theta is removed."""
    return (grad * theta).abs()


def second_order(fisher: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 3: |theta * H_jj * theta| with the Hessian diagonal approximated by the Fisher F."""
    return (theta * fisher * theta).abs()


def mixed(grad: torch.Tensor, fisher: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 4: |g * theta - 1/2 * theta^2 * F|."""
    return (grad * theta - 0.5 * theta * fisher * theta).abs()


def gradient_magnitude(grad: torch.Tensor) -> torch.Tensor:
    """|dL/dtheta|: Eq. 2 without its theta factor (beyond the paper). Every client scores at the
    same seeded theta_0, so |g * theta_0| carries theta_0's magnitudes, the same for every client, into
    every client's ranking (docs/experiments.md: the paper's masks overlap the top-k of |theta_0| by
    about as much as they overlap each other); |g| ranks by what the client's data says alone."""
    return grad.abs()


def importance(metric: str, grad: torch.Tensor, fisher: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Scores for `metric` in {first, second, mixed, gradient}; same shape as theta."""
    if metric == "first":
        return first_order(grad, theta)
    if metric == "gradient":
        return gradient_magnitude(grad)
    if metric == "second":
        return second_order(fisher, theta)
    if metric == "mixed":
        return mixed(grad, fisher, theta)
    raise ValueError(f"unknown importance metric {metric!r}; use first, second, mixed or gradient")


def scoring_units(batches: list[list[T]], metric: str) -> list[list[T]]:
    """What each gradient of a scoring step is taken over. `first` and `gradient` need only the mean gradient:
    one gradient per micro-batch. `second` and `mixed` need the empirical Fisher diagonal, the mean
    of *per-example* squared gradients: one gradient per example. (Squaring one micro-batch's
    gradient instead gives F = g^2, so Eq. 3 ranks exactly as Eq. 2 and Eq. 4 almost so: measured on
    the grid, the second-order cell then reproduced the first-order one to the last digit.)"""
    if metric in ("first", "gradient"):
        return batches
    return [[example] for batch in batches for example in batch]


def gradient_moments(batch_grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean gradient g and empirical Fisher diagonal F = mean_b g_b^2 over the scoring units'
    gradients g_b (`scoring_units`: per example for the metrics that read F)."""
    if not batch_grads:
        raise ValueError("gradient_moments needs at least one batch gradient")
    stacked = torch.stack(batch_grads)
    return stacked.mean(0), stacked.pow(2).mean(0)
