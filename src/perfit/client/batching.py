"""Micro-batches as the model reads them: packed (one row of all the examples' tokens, attention kept
within each example) or padded, with next-token targets that carry loss on response tokens only."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from perfit.client.data import Example
from perfit.client.model import device_of


def compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype autocast computes in on `device_type` where it is on, else `fallback`."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else fallback


PACKED_ATTENTION = "perfit_packed"


@torch.compiler.disable  # per-sequence calls at data-dependent bounds: eager between compiled parts
def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each sequence of a packed row on its own (a transformers attention
    function): `cu_seq_lens_q` holds the sequences' boundaries. Each sequence runs at its own length
    with no mask, so neither padding nor other sequences' tokens cost attention FLOPs or leak in.

    Under bf16 autocast the kernel still runs in fp32 and its output is cast back: the CPU flash
    kernel's bf16 backward is slower than its fp32 one at these lengths, and fp32 attention is the
    more precise (docs/speed.md)."""
    lengths = [b - a for a, b in itertools.pairwise(kwargs["cu_seq_lens_q"].tolist())]
    dtype = compute_dtype(query.device.type, value.dtype)
    outputs = []
    with torch.autocast(query.device.type, enabled=False):
        # split, not one slice per sequence: a slice's backward zero-fills a full-length gradient for
        # every sequence and adds them up; split's backward concatenates the pieces once
        # (benchmarks/packed_attention.py)
        pieces = zip(*(x.float().split(lengths, dim=2) for x in (query, key, value)), strict=True)
        for q, k, v in pieces:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
            outputs.append(attended.to(dtype))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def packed_batch(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """A micro-batch as one row of all its tokens, no padding: `position_ids` restart at every
    example, `targets` is each example's next-token label (-100 on prompt tokens and on its last
    position), and `cu_seq_lens` are the examples' boundaries."""
    ids, positions, targets, bounds = [], [], [], [0]
    for example in examples:
        ids += example.input_ids
        positions += range(len(example.input_ids))
        targets += [*example.labels[1:], -100]
        bounds.append(bounds[-1] + len(example.input_ids))
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "targets": torch.tensor([targets]),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
    }


def padded_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; `targets` is the next token's label, -100 on prompt and padding."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        targets[row, : n - 1] = torch.tensor(example.labels[1:])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention}


def runs_packed(peft_model: Any) -> bool:
    """Whether micro-batches go to the model packed (`packed_batch`) rather than padded (`padded_batch`): on the
    CPU, eager or compiled (`model.compile_decoder` leaves the packed attention eager). GPUs keep
    padded batches (not measured there)."""
    return device_of(peft_model.get_base_model()).type == "cpu"


def batch_for(
    peft_model: Any, examples: Sequence[Example], pad_id: int, packed: bool | None = None
) -> dict[str, torch.Tensor]:
    """The micro-batch packed or padded: as `packed` says, or (None) in the layout the model runs
    (`runs_packed`)."""
    if packed is None:
        packed = runs_packed(peft_model)
    return packed_batch(examples) if packed else padded_batch(examples, pad_id)


@contextlib.contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run `model`'s attention layers with the transformers attention function `name` inside the
    block (they read it from the config at every forward), and restore the previous one after."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def micro_batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive micro-batches, each sorted by length so that padding stays small."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]
