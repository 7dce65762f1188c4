"""Local work on one client: loss on response tokens, masked LoRA training, importance scoring for
the search, and personalized perplexity. Independent of Flower."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from perfit import onednn
from perfit.allocator import LARGEST_MMAP_THRESHOLD_BYTES
from perfit.data import Example
from perfit.importance import gradient_moments, importance, scoring_units
from perfit.model import device_of, lora_parameters, read_flat, write_flat


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ('' where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AVX-512 BF16 or AMX)."""
    flags = _cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def training_autocast(dtype: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype for local training on `device` (None: fp32). `auto` picks bf16 on CPUs with
    bf16 units (measured 1.6x the tokens/s of fp32 with the same perplexity, docs/performance.md) and
    on GPUs with native bf16 (compute capability 8.0 or later; older ones only emulate it)."""
    if dtype == "auto":
        device = torch.device(device)
        has_bf16 = torch.cuda.get_device_capability(device) >= (8, 0) if device.type == "cuda" else cpu_has_bf16()
        return torch.bfloat16 if has_bf16 else None
    return torch.bfloat16 if dtype == "bf16" else None


def autocast(model: Any, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on the model's device type; a no-op context for fp32 (None)."""
    return torch.autocast(device_of(model).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


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
    kernel's bf16 backward is slower than its fp32 one at these lengths (128 tokens: 2.1 ms vs 0.9 ms,
    9 heads of 64), and fp32 attention is the more precise."""
    lengths = [b - a for a, b in itertools.pairwise(kwargs["cu_seq_lens_q"].tolist())]
    dtype = compute_dtype(query.device.type, value.dtype)
    outputs = []
    with torch.autocast(query.device.type, enabled=False):
        # split, not one slice per sequence: a slice's backward zero-fills a full-length gradient for
        # every sequence and adds them up; split's backward concatenates the pieces once
        # (benchmarks/packed_attention.py: 1.13-1.37x per layer, forward and backward, in three runs;
        # the same gradients)
        pieces = zip(*(x.float().split(lengths, dim=2) for x in (query, key, value)), strict=True)
        for q, k, v in pieces:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
            outputs.append(attended.to(dtype))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def pack(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
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


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
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


def packs(peft_model: Any) -> bool:
    """Whether micro-batches go to the model packed (`pack`) rather than padded (`collate`): on the
    CPU, eager or compiled (`model.compile_decoder` leaves the packed attention eager). GPUs keep
    padded batches (not measured there)."""
    return device_of(peft_model.get_base_model()).type == "cpu"


def batch_for(
    peft_model: Any, examples: Sequence[Example], pad_id: int, packed: bool | None = None
) -> dict[str, torch.Tensor]:
    """The micro-batch packed or padded: as `packed` says, or (None) in the layout the model runs
    (`packs`)."""
    if packed is None:
        packed = packs(peft_model)
    return pack(examples) if packed else collate(examples, pad_id)


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


def head_chunk(vocab: int, limit: int = LARGEST_MMAP_THRESHOLD_BYTES) -> int:
    """Rows of the head's logits per chunk: the most, in steps of 32 (at least 32), whose fp32 logits
    fit in `limit` bytes. glibc serves larger blocks with fresh mmaps that every chunk faults in again
    (`allocator`): at SmolLM2's 49,152 tokens 256 rows are 50 MB and 160 rows 31.5 MB. A bf16 head
    over 600 rows ran 357 ms a call in 256-row chunks (31k page faults a call) and 351 ms in 160-row
    ones (3.5k), 326 ms with the head's bf16 copy made once (`onednn.head_weight`; no faults),
    medians of 6 (`python benchmarks/bf16_paths.py`); fp32 ran 459 vs 461 ms in 256- and 128-row
    chunks (best of 5, a script not kept)."""
    return max(32, limit // (4 * vocab) // 32 * 32)


class _HeadNLL(torch.autograd.Function):
    """Summed NLL of a frozen, bias-free vocabulary head over `hidden` rows, `chunk` rows at a time;
    the gradient for `hidden`, (softmax - onehot) @ W, is formed in the same pass, so no
    rows x vocabulary logits, log-probabilities or their gradients outlive a chunk."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, via_onednn: bool
    ) -> torch.Tensor:
        device = hidden.device.type
        dtype = compute_dtype(device, hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        with torch.autocast(device, enabled=False):  # the head cast once per call, not per chunk
            weight = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = onednn.head_matmul_t(hidden[rows].to(dtype), weight, via_onednn).float()
                picked = targets[rows]
                target_logits = logits.gather(1, picked[:, None]).squeeze(1)
                # the softmax in place: logsumexp would allocate and fill a chunk-sized temporary of
                # its own and the probabilities a second pass (head over 600 rows 112 -> 101 ms,
                # bf16 on a Xeon with AMX, best of 7, the same NLL; a script not kept)
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()
                sums = probs.sum(dim=-1, keepdim=True)
                total += (sums.log() + top).squeeze(1).sub_(target_logits).sum()
                probs.div_(sums)
                probs[torch.arange(len(picked), device=probs.device), picked] -= 1.0
                grad[rows] = probs.to(dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None, None


def head_nll(
    head: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    via_onednn: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of `hidden` rows (one per target) through the vocabulary `head`. With
    gradients on and a frozen bias-free linear head (the Llama family's) it runs `_HeadNLL`, `chunk`
    rows at a time (None: `head_chunk`), with `weight` for the head's (a copy of it already in the
    compute dtype: `onednn.head_weight`); else the plain logits + cross-entropy. `via_onednn`: the
    logits' matmul through oneDNN (fp32 CPU)."""
    frozen = isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad
    if frozen and torch.is_grad_enabled() and hidden.requires_grad:
        weight = head.weight if weight is None else weight
        rows = head_chunk(weight.shape[0]) if chunk is None else chunk
        return _HeadNLL.apply(hidden, weight, targets, rows, via_onednn)
    logits = onednn.head_matmul_t(hidden, head.weight, True) if frozen and via_onednn else head(hidden)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def nll_sum(peft_model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens, and their count, of a `pack`ed or `collate`d batch.

    The vocabulary head runs only at positions that predict a target token: prompt and padding
    positions carry no loss, and the 49k-wide head would otherwise dominate the cost.
    """
    causal_lm = peft_model.get_base_model()
    batch = {key: value.to(device_of(causal_lm)) for key, value in batch.items()}
    decoder = causal_lm.get_decoder()
    if "cu_seq_lens" in batch:
        bounds = batch["cu_seq_lens"]
        _register_packed_attention()
        with attention_implementation(causal_lm, PACKED_ATTENTION):
            hidden = decoder(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=bounds,
                cu_seq_lens_k=bounds, use_cache=False,
            ).last_hidden_state  # fmt: skip
    else:
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
    selected = batch["targets"] != -100
    head = causal_lm.get_output_embeddings()
    weight = onednn.head_weight(causal_lm, compute_dtype(hidden.device.type, hidden.dtype))
    total = head_nll(
        head, hidden[selected], batch["targets"][selected], via_onednn=onednn.head_routed(causal_lm), weight=weight
    )
    return total, int(selected.sum())


def micro_batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive micro-batches, each sorted by length so that padding stays small."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


@dataclass(frozen=True)
class TrainResult:
    flat: torch.Tensor
    loss: float  # mean NLL per target token over the local epochs
    examples: int  # rows that carry loss (the aggregation weight n_j)
    steps: int


def train_masked(
    peft_model: Any,
    start: torch.Tensor,
    mask: torch.Tensor,
    examples: Sequence[Example],
    pad_id: int,
    *,
    epochs: int,
    batch_size: int,
    micro_batch_size: int,
    lr: float,
    seed: int,
    autocast_dtype: torch.dtype | None = None,
    packed: bool | None = None,
) -> TrainResult:
    """AdamW on the LoRA entries inside `mask` only; every other entry stays exactly zero.

    `autocast_dtype` (e.g. torch.bfloat16) runs the forward/backward under autocast; parameters,
    gradients and optimizer state stay fp32. `packed` forces packed or padded micro-batches (None:
    `packs`; the speed bench times both).

    Gradients are masked before the step (so AdamW moments never see outside entries) and the
    parameters are re-masked after it (so weight decay cannot move them either). A batch of
    `batch_size` examples is accumulated from micro-batches, normalised by its target tokens.
    """
    write_flat(peft_model, start * mask)
    params = lora_parameters(peft_model)
    masks, offset = [], 0
    for param in params:
        masks.append(mask[offset : offset + param.numel()].view_as(param).to(param.device, param.dtype))
        offset += param.numel()
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    total_nll, total_tokens, steps = 0.0, 0, 0
    peft_model.train()
    with onednn.frozen_linears(peft_model, autocast_dtype):
        for _ in range(epochs):
            order = list(examples)
            rng.shuffle(order)
            for start_index in range(0, len(order), batch_size):
                batch = order[start_index : start_index + batch_size]
                batch_tokens = sum(e.target_tokens for e in batch)
                if batch_tokens == 0:
                    continue
                optimizer.zero_grad(set_to_none=True)
                for chunk in micro_batches(batch, micro_batch_size):
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


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total NLL / total target tokens)."""
    return math.exp(total_nll / tokens) if tokens else float("nan")


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
    (`importance.scoring_units`; the same forward/backward FLOPs in smaller matmuls)."""
    units = scoring_units([list(batch) for batch in batches], metric)
    grad, fisher = gradient_moments(batch_gradients(peft_model, theta, units, pad_id, autocast_dtype))
    return importance(metric, grad, fisher, theta)
