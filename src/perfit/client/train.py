"""Local work on one client: masked LoRA training (AdamW on the mask's entries only), evaluation on
held-out rows, and the gradients the search scores (Eq. 2-4). Independent of Flower."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from perfit.client import onednn
from perfit.client.batching import batch_for, micro_batches
from perfit.client.data import Example
from perfit.client.loss import nll_sum
from perfit.client.model import device_of, lora_parameters, read_flat, write_flat
from perfit.config import Config
from perfit.core.importance import gradient_moments, importance, scoring_units


def autocast(model: Any, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on the model's device type; a no-op context for fp32 (None)."""
    return torch.autocast(device_of(model).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@dataclass(frozen=True)
class TrainResult:
    flat: torch.Tensor
    loss: float  # mean NLL per target token over the local epochs
    examples: int  # rows that carry loss (the aggregation weight n_j)
    steps: int


@dataclass(frozen=True)
class Schedule:
    """How a client trains: `epochs` over its rows in a `seed`ed order, `batch_size` examples per
    AdamW step at rate `lr`, accumulated from micro-batches of `micro_batch_size` examples."""

    epochs: int
    batch_size: int
    micro_batch_size: int
    lr: float
    seed: int = 0

    @classmethod
    def of(cls, config: Config, epochs: int | None = None, seed: int = 0) -> Schedule:
        """The config's batch, micro-batch and rate; `epochs` (default: local_epochs) and `seed`."""
        return cls(epochs or config.local_epochs, config.batch_size, config.micro_batch_size, config.lr, seed)


def train_masked(
    peft_model: Any,
    start: torch.Tensor,
    mask: torch.Tensor,
    examples: Sequence[Example],
    pad_id: int,
    schedule: Schedule,
    *,
    autocast_dtype: torch.dtype | None = None,
    packed: bool | None = None,
) -> TrainResult:
    """AdamW on the LoRA entries inside `mask` only; every other entry stays exactly zero.

    `autocast_dtype` (e.g. torch.bfloat16) runs the forward/backward under autocast; parameters,
    gradients and optimizer state stay fp32. `packed` forces packed or padded micro-batches (None:
    `batching.runs_packed`; the speed bench times both).

    Gradients are masked before the step (so AdamW moments never see outside entries) and the
    parameters are re-masked after it (so weight decay cannot move them either). A batch of
    `schedule.batch_size` examples is accumulated from micro-batches, normalised by its target tokens.
    """
    write_flat(peft_model, start * mask)
    params = lora_parameters(peft_model)
    masks, offset = [], 0
    for param in params:
        masks.append(mask[offset : offset + param.numel()].view_as(param).to(param.device, param.dtype))
        offset += param.numel()
    optimizer = torch.optim.AdamW(params, lr=schedule.lr)
    rng = random.Random(schedule.seed)
    total_nll, total_tokens, steps = 0.0, 0, 0
    peft_model.train()
    with onednn.frozen_linears(peft_model, autocast_dtype):
        for _ in range(schedule.epochs):
            order = list(examples)
            rng.shuffle(order)
            for start_index in range(0, len(order), schedule.batch_size):
                batch = order[start_index : start_index + schedule.batch_size]
                batch_tokens = sum(e.target_tokens for e in batch)
                if batch_tokens == 0:
                    continue
                optimizer.zero_grad(set_to_none=True)
                for chunk in micro_batches(batch, schedule.micro_batch_size):
                    with autocast(peft_model, autocast_dtype):
                        loss_sum, _ = nll_sum(peft_model, batch_for(peft_model, chunk, pad_id, packed))
                    (loss_sum / batch_tokens).backward()
                    total_nll += loss_sum.item()
                total_tokens += batch_tokens
                with torch.no_grad():
                    for param, param_mask in zip(params, masks, strict=True):
                        param.grad.mul_(param_mask)
                    optimizer.step()
                    for param, param_mask in zip(params, masks, strict=True):
                        param.mul_(param_mask)
                steps += 1
    peft_model.eval()
    loss = total_nll / total_tokens if total_tokens else float("nan")
    used = sum(1 for e in examples if e.target_tokens)  # rows cut to prompt only carry no loss
    return TrainResult(flat=read_flat(peft_model), loss=loss, examples=used, steps=steps)


@torch.no_grad()
def evaluate_nll(
    peft_model: Any, flat: torch.Tensor, examples: Sequence[Example], pad_id: int, micro_batch_size: int
) -> tuple[float, int]:
    """(total NLL, total target tokens) of the adapter `flat` on `examples`."""
    write_flat(peft_model, flat)
    peft_model.eval()
    total, tokens = 0.0, 0
    with onednn.frozen_linears(peft_model):  # the head's logits; the layers keep torch's matmuls
        for chunk in micro_batches(examples, micro_batch_size):
            loss_sum, count = nll_sum(peft_model, batch_for(peft_model, chunk, pad_id))
            total += loss_sum.item()
            tokens += count
    return total, tokens


def batch_gradients(
    peft_model: Any,
    flat: torch.Tensor,
    batches: Sequence[Sequence[Example]],
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Flat LoRA gradient (fp32) of each micro-batch's mean target-token loss at adapter `flat`;
    the forward/backward under autocast when `autocast_dtype` is given (as in training)."""
    write_flat(peft_model, flat)
    params = lora_parameters(peft_model)
    grads = []
    peft_model.eval()
    with onednn.frozen_linears(peft_model, autocast_dtype):
        for chunk in batches:
            for param in params:
                param.grad = None
            with autocast(peft_model, autocast_dtype):
                loss_sum, count = nll_sum(peft_model, batch_for(peft_model, chunk, pad_id))
            (loss_sum / max(count, 1)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]).cpu())
    for param in params:
        param.grad = None
    return grads


def importance_scores(
    peft_model: Any,
    theta: torch.Tensor,
    batches: Sequence[Sequence[Example]],
    pad_id: int,
    metric: str,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Eq. 2-4 scores of every element of the adapter `theta` from the scoring batches: one gradient
    per micro-batch for `first`, one per example for the metrics that read the Fisher diagonal
    (`core.importance.scoring_units`; the same forward/backward FLOPs in smaller matmuls)."""
    units = scoring_units([list(batch) for batch in batches], metric)
    grad, fisher = gradient_moments(batch_gradients(peft_model, theta, units, pad_id, autocast_dtype))
    return importance(metric, grad, fisher, theta)
