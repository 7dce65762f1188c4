"""Alg. 1: iterative pruning of the dense LoRA to an exact parameter budget. Pure tensor functions.

Alg. 1 line 5 prints `I < tau` (keep the lowest scores); the text says the opposite ("we preserve the
parameters that align with the top 100(1-s)% importance scores"), and so do we: highest scores stay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def keep_fraction(step: int, total_steps: int, sparsity: float) -> float:
    """Fraction of all elements kept after pruning step `step` of `total_steps`: (1-s)^(t/T_p)."""
    if not 0 <= step <= total_steps or total_steps < 1:
        raise ValueError(f"step {step} outside 0..{total_steps}")
    return (1.0 - sparsity) ** (step / total_steps)


def keep_counts(total: int, budget: int, total_steps: int) -> list[int]:
    """Elements kept after each step 1..T_p; the last is exactly `budget`.

    The sparsity is the effective one, 1 - budget/total, so rounding of the dense rank never leaves
    the final mask off budget; counts never increase.
    """
    if not 0 < budget <= total:
        raise ValueError(f"budget {budget} must be in 1..{total}")
    sparsity = 1.0 - budget / total
    counts = [max(budget, round(total * keep_fraction(t, total_steps, sparsity))) for t in range(1, total_steps + 1)]
    counts[-1] = budget
    return counts


def top_k_mask(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores among alive elements; ties go to the lower flat index."""
    if k > int(alive.sum()):
        raise ValueError(f"cannot keep {k} of {int(alive.sum())} alive elements")
    ranked = torch.where(alive, scores.float(), torch.full_like(scores, -torch.inf, dtype=torch.float))
    order = torch.sort(ranked.flatten(), descending=True, stable=True).indices[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask.view_as(scores)


def prune_step(
    scores: torch.Tensor, alive: torch.Tensor, keeps: list[int], groups: list[tuple[int, int]]
) -> torch.Tensor:
    """One step of Alg. 1 on a flat score vector: each (start, end) slice keeps its top `keeps[i]`.

    One slice spanning everything ranks all LoRA tensors together (scope=global); one slice per LoRA
    module prunes each module on its own (scope=per_module).
    """
    mask = torch.zeros_like(alive)
    for (start, end), keep in zip(groups, keeps, strict=True):
        mask[start:end] = top_k_mask(scores[start:end], alive[start:end], keep)
    return mask


def step_batches(count: int, per_step: int, step: int) -> list[int]:
    """Indices of the micro-batches scored at pruning step `step` (0-based): the steps take the
    client's `count` shuffled micro-batches in turn, `per_step` at a time, wrapping around; so T_p
    steps of one micro-batch see min(T_p, count) different micro-batches for the cost of T_p."""
    if count < 0 or per_step < 1 or step < 0:
        raise ValueError(f"step_batches: count {count}, per_step {per_step}, step {step}")
    return [(step * per_step + i) % count for i in range(min(per_step, count))] if count else []


def search_mask(
    score_fn: Callable[[torch.Tensor, int], torch.Tensor],
    groups: list[tuple[int, int, int]],
    total_steps: int,
) -> torch.Tensor:
    """Alg. 1: T_p rounds of score -> keep the top survivors on the exponential schedule.

    `groups` lists (start, end, budget) slices of the flat adapter, pruned independently;
    `score_fn(alive, step)` returns flat importance scores of the adapter with pruned entries zeroed
    (step 0..T_p-1, so each step may score different data).
    The returned boolean mask holds exactly sum(budget) elements.
    """
    total = max(end for _, end, _ in groups)
    schedules = [keep_counts(end - start, budget, total_steps) for start, end, budget in groups]
    spans = [(start, end) for start, end, _ in groups]
    alive = torch.ones(total, dtype=torch.bool)
    for step in range(total_steps):
        alive = prune_step(score_fn(alive, step), alive, [schedule[step] for schedule in schedules], spans)
    return alive
