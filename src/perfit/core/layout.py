"""The flat adapter: every LoRA tensor of a model laid end to end in one fp32 vector, in peft's
parameter order (A then B of each module). Masks, aggregation and messages all work on this vector;
`Layout` says where each tensor lives in it. Also the seeded initial adapter (paper §4.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """Where one LoRA tensor lives in the flat adapter: its slice [start, end) and its shape."""

    name: str  # peft parameter name without the adapter name, as saved in adapter_model.safetensors
    shape: tuple[int, ...]
    start: int

    @property
    def end(self) -> int:
        return self.start + math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Where every LoRA tensor lives in the flat adapter (peft's parameter order: A, B per module)."""

    slots: tuple[Slot, ...]

    @property
    def size(self) -> int:
        return self.slots[-1].end

    def module_pairs(self) -> list[tuple[Slot, Slot]]:
        """(A, B) of every LoRA module."""
        return list(zip(self.slots[::2], self.slots[1::2], strict=True))

    def module_groups(self, rank_budget: int) -> list[tuple[int, int, int]]:
        """(start, end, budget) per LoRA module (its A and B together) for scope=per_module."""
        return [(a.start, b.end, rank_budget * (a.shape[1] + b.shape[0])) for a, b in self.module_pairs()]

    def budget(self, rank_budget: int) -> int:
        """Trainable parameters of a rank-`rank_budget` adapter on the same modules."""
        return sum(budget for _, _, budget in self.module_groups(rank_budget))

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {slot.name: flat[slot.start : slot.end].view(slot.shape) for slot in self.slots}


def initial_adapter(layout: Layout, init: str, seed: int) -> torch.Tensor:
    """The seeded dense adapter every client starts from (server and clients derive the same one).

    `symmetric`: A, B ~ N(0, 1/d) with d the layer's input width (paper §4.2), so no score vanishes;
    `peft`: A ~ kaiming-uniform(a=sqrt(5)) as peft does, B = 0 (dense LoRA start; vanishing A scores).
    """
    generator = torch.Generator().manual_seed(seed)
    flat = torch.zeros(layout.size)
    for a, b in layout.module_pairs():
        d_in = a.shape[1]
        if init == "peft":
            bound = 1.0 / math.sqrt(d_in)
            flat[a.start : a.end] = torch.rand(math.prod(a.shape), generator=generator) * 2 * bound - bound
        else:
            std = 1.0 / math.sqrt(d_in)
            flat[a.start : a.end] = torch.randn(math.prod(a.shape), generator=generator) * std
            flat[b.start : b.end] = torch.randn(math.prod(b.shape), generator=generator) * std
    return flat


def zero_b(layout: Layout, flat: torch.Tensor) -> torch.Tensor:
    """Copy of `flat` with every B matrix zeroed (init=symmetric_then_zero_b after the search)."""
    result = flat.clone()
    for b in layout.slots[1::2]:
        result[b.start : b.end] = 0
    return result


def budget_groups(layout: Layout, scope: str, rank_budget: int) -> list[tuple[int, int, int]]:
    """Slices pruned independently with their budgets: one for scope=global, one per module otherwise."""
    if scope == "per_module":
        return layout.module_groups(rank_budget)
    return [(0, layout.size, layout.budget(rank_budget))]
