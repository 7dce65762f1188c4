"""The training passes the speed benches time: the seeded rows, the loop a user writes with peft and
torch, perfit's local training of one client on a random mask of its budget, and `TimedPasses`, the
model, rows and timing that `perfit bench speed` shares between its passes.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from perfit.artifacts.lora import lora_layout
from perfit.client.data import Example, tokenize
from perfit.client.model import attach_lora, device_of, lora_parameters
from perfit.client.train import Schedule, autocast, evaluate_nll, train_masked
from perfit.config import Config
from perfit.core.layout import initial_adapter
from perfit.core.metrics import perplexity


def sample_examples(
    all_rows: list[dict[str, str]], tokenizer: Any, rows: int, cutoff_len: int, held_out: int | None = None
) -> tuple[list[Example], list[Example]]:
    """The bench's seeded (train, held-out) rows of the data file, tokenised: `rows` to train on and
    `held_out` (default as many) after them in the same seeded draw, so a smaller held-out set is a
    prefix of the default one and the train rows never change with it."""
    held_out = rows if held_out is None else held_out
    picked = random.Random(0).sample(range(len(all_rows)), rows + held_out)
    examples = [tokenize(all_rows[i], tokenizer, cutoff_len) for i in picked]
    return examples[:rows], examples[rows:]


def random_mask(size: int, budget: int, seed: int) -> torch.Tensor:
    """A seeded mask holding exactly `budget` of `size` positions (timing only; not a searched mask)."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:budget]] = True
    return mask


def plain_peft_pass(
    peft_model: Any,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    micro: int,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """The loop a user writes with peft + torch: padded micro-batches in data order, the full head
    and HF's loss on every position, AdamW on all LoRA parameters; the forward/backward under
    autocast when `autocast_dtype` is given."""
    params = lora_parameters(peft_model)
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    device = device_of(peft_model)
    peft_model.train()
    for start in range(0, len(examples), batch_size):
        optimizer.zero_grad(set_to_none=True)
        batch = examples[start : start + batch_size]
        for offset in range(0, len(batch), micro):
            chunk = batch[offset : offset + micro]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in chunk])
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk])
            attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
            with autocast(peft_model, autocast_dtype):
                loss = peft_model(
                    input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)
                ).loss
            loss.backward()
        optimizer.step()
    peft_model.eval()


def local_pass(
    base: Any,
    config: Config,
    pad_id: int,
    rank: int,
    budget_rank: int,
    autocast: torch.dtype | None = None,
    packed: bool | None = None,
    micro_batch_size: int | None = None,
) -> tuple[Any, Any, Any]:
    """(peft model, layout, run) for timing one client's local training: a fresh rank-`rank` adapter
    on `base` with a seeded random mask of the rank-`budget_rank` budget (FIT: both r; PerFIT: the
    dense rank r/(1-s) masked to r's budget), and `run(rows)`, one epoch of `train_masked` over the
    rows from the same start and seed, at the config's batch and `micro_batch_size` (default the
    config's)."""
    peft_model = attach_lora(base, rank, 2.0 * rank)
    layout = lora_layout(peft_model)
    mask = random_mask(layout.size, layout.budget(budget_rank), seed=0)
    start = initial_adapter(layout, "peft", 0) * mask
    schedule = Schedule(1, config.batch_size, micro_batch_size or config.micro_batch_size, config.lr, seed=0)

    def run(subset: list[Example]) -> Any:
        return train_masked(peft_model, start, mask, subset, pad_id, schedule, autocast_dtype=autocast, packed=packed)

    return peft_model, layout, run


@dataclass
class TimedPasses:
    """What the bench's timed training passes share: the model, the rows, and how a pass is timed and
    its adapter scored."""

    config: Config
    base: Any
    pad: int
    train: list[Example]
    held_out: list[Example]
    evaluator: Any  # an eager rank-r copy of the model, never compiled: every adapter is scored on it
    # each precision's perfit pass (same start, rows and seed), and "padded": the training precision's
    # pass on padded micro-batches
    trained: dict[str, Any] = field(default_factory=dict)
    scored: dict[str, float] = field(default_factory=dict)

    @functools.cached_property
    def longest(self) -> list[Example]:
        """The micro-batch of the longest train rows: the warm-up pass's."""
        return sorted(self.train, key=lambda e: len(e.input_ids))[-self.config.micro_batch_size :]

    def timed(self, fn: Any, warm: bool = True) -> tuple[float, Any]:
        """(seconds, result) of `fn(train)` after a warm-up on the longest micro-batch: kernel choice,
        and the heap grown to its high-water mark (`allocator.keep_freed_memory` keeps it), as it
        is after a run's first steps; otherwise whichever pass comes first pays the page faults.
        `warm=False` where the pass just before trained the same rows in the same layout (it has
        run the longest micro-batch already)."""
        if warm:
            fn(self.longest)
        begin = time.perf_counter()
        result = fn(self.train)
        return time.perf_counter() - begin, result

    def masked(
        self, rank: int, budget_rank: int, autocast: torch.dtype | None = None, packed: bool | None = None
    ) -> tuple[Any, Any, Any]:
        """`local_pass` on the bench's model: (peft model, layout, run)."""
        return local_pass(self.base, self.config, self.pad, rank, budget_rank, autocast, packed)

    def held_out_ppl(self, flat: torch.Tensor) -> float:
        """Personalized perplexity of a rank-r adapter on the held-out rows, fp32 and eager."""
        return perplexity(*evaluate_nll(self.evaluator, flat, self.held_out, self.pad, self.config.micro_batch_size))

    def trained_ppl(self, name: str) -> float:
        """`held_out_ppl` of precision `name`'s perfit pass (`trained[name]`), evaluated once: several
        ratios share it (packed / padded, oneDNN / BLAS, compiled / eager, bf16 / fp32)."""
        if name not in self.scored:
            self.scored[name] = self.held_out_ppl(self.trained[name].flat)
        return self.scored[name]
