"""What this machine's matmuls reach and what a LoRA training step asks of them: square-matmul peaks,
the frozen decoder's GEMM shapes and their rate at a micro-batch's size, and the useful FLOPs that
MFU counts (`perfit bench speed`, on the CPU and on a GPU).

Useful FLOPs of one LoRA training pass over a sequence of T tokens (P of them predicting a target),
with the base model frozen:
  linear layers    4 * N_lin * T        forward + activation gradients (no weight gradients)
  LoRA adapters    6 * N_lora * T       forward + activation gradients + adapter gradients
  attention        6 * L * d * T(T+1)   causal QK^T and AV forward (2 L d T(T+1)) and backward (x2)
  vocabulary head  4 * V * d * P        forward + activation gradients, at target positions only
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from perfit.client.batching import micro_batches
from perfit.client.data import Example
from perfit.client.hardware import cpu_has_bf16
from perfit.config import Config


def cpu_description() -> str:
    """The CPU model and whether it has bf16 units (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()} ({'bf16 units' if cpu_has_bf16() else 'no bf16 units'})"


def matmul_peak_gflops(
    dtype: torch.dtype, size: int = 2048, seconds: float = 3.0, device: torch.device | str = "cpu"
) -> float:
    """Best sustained square-matmul rate on `device` (on the CPU: of this process's threads), in
    GFLOP/s; on a GPU each timed product ends when the device has finished it."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))

    def product() -> None:
        torch.mm(a, b)
        synchronize(a.device)

    return 2 * size**3 / _best_seconds(product, seconds) / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = tuple(DTYPES)


def autocast_for(precision: str) -> torch.dtype | None:
    """The autocast dtype of a timed precision (`train_masked`'s `autocast_dtype`; None: fp32)."""
    return None if precision == "fp32" else DTYPES[precision]


def emulated_bf16_probe(size: int = 512, seconds: float = 1.0) -> dict[str, float]:
    """Square-matmul rates in bf16 and fp32 at a small `size`: on a CPU without bf16 units torch
    emulates bf16 matmuls, and a probe at the peak's size (2048) would itself take minutes."""
    return {name: matmul_peak_gflops(DTYPES[name], size, seconds) for name in PRECISIONS} | {"size": size}


def decoder_gemms(model: Any) -> dict[tuple[int, int], int]:
    """(in_features, out_features) -> how many frozen linear layers of the decoder blocks have that
    shape (q, k, v, o, gate, up, down; not embeddings or head; peft's lora_A / lora_B, also
    nn.Linear, are counted as LoRA elsewhere, not here)."""
    shapes: dict[tuple[int, int], int] = {}
    for name, m in model.get_decoder().layers.named_modules():
        if isinstance(m, torch.nn.Linear) and "lora_" not in name:
            key = (m.in_features, m.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def linear_params(model: Any) -> int:
    """Weights of the frozen linear layers inside the decoder blocks (`decoder_gemms`)."""
    return sum(fan_in * fan_out * count for (fan_in, fan_out), count in decoder_gemms(model).items())


def gemm_flops(shapes: dict[tuple[int, int], int], tokens: int) -> float:
    """FLOPs of the frozen linears over `tokens` rows: forward X W^T and activation gradient dY W,
    2 * tokens * in * out each (the `4 * N_lin * T` term of the module docstring)."""
    return 4.0 * tokens * sum(i * o * n for (i, o), n in shapes.items())


def gemm_rate_gflops(
    shapes: dict[tuple[int, int], int], tokens: int, dtype: torch.dtype, seconds: float = 2.0
) -> float:
    """The rate, in GFLOP/s, at which this process's threads run the frozen decoder's own GEMMs at
    one micro-batch of `tokens` rows: each shape's forward and activation-gradient matmul at its best
    time over repeats (inputs already in `dtype`, no casts), weighted by how often the model runs it.
    The ceiling the linear layers of a training step can reach at these shapes, below the square
    peak when the shapes are small."""
    total = 0.0
    for (fan_in, fan_out), count in shapes.items():
        x, dy = torch.randn(tokens, fan_in, dtype=dtype), torch.randn(tokens, fan_out, dtype=dtype)
        w = torch.randn(fan_out, fan_in, dtype=dtype)
        total += count * _best_seconds(lambda x=x, w=w, dy=dy: (torch.nn.functional.linear(x, w), dy @ w),
                                       seconds / len(shapes))  # fmt: skip
    return gemm_flops(shapes, tokens) / total / 1e9


def _best_seconds(fn: Any, seconds: float) -> float:
    """The shortest of repeated calls of `fn` within `seconds` (after one untimed call)."""
    fn()
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == math.inf:
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def gemm_ceiling(
    model: Any, train: list[Example], config: Config, seconds: float = 2.0, precisions: tuple[str, ...] = PRECISIONS
) -> dict[str, Any]:
    """The frozen decoder's GEMM rate in each of `precisions` at the mean packed micro-batch that
    local training runs over `train` under `config` (`gemm_rate_gflops`, `tokens_per_micro_batch`)."""
    tokens = tokens_per_micro_batch(train, config.batch_size, config.micro_batch_size, packed=True)
    shapes = decoder_gemms(model)
    gflops = {name: gemm_rate_gflops(shapes, tokens, DTYPES[name], seconds) for name in precisions}
    return {"tokens_per_micro_batch": tokens, "gflops": gflops}


def tokens_per_micro_batch(examples: list[Example], batch_size: int, micro: int, *, packed: bool, seed: int = 0) -> int:
    """Mean tokens of the micro-batches one epoch of `train_masked` runs: the rows shuffled with
    `seed`, cut into batches of `batch_size`, each sorted by length into micro-batches of `micro`;
    packed, a micro-batch is its rows' tokens, padded, rows x the longest row's width."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    sizes = [
        sum(len(e.input_ids) for e in chunk) if packed else len(chunk) * max(len(e.input_ids) for e in chunk)
        for start in range(0, len(order), batch_size)
        for chunk in micro_batches(order[start : start + batch_size], micro)
    ]
    return round(statistics.fmean(sizes))


def useful_flops(model_config: Any, n_linear: int, n_lora: int, examples: list[Example]) -> float:
    """Useful FLOPs of one training pass over `examples` (see the module docstring)."""
    layers, width, vocab = model_config.num_hidden_layers, model_config.hidden_size, model_config.vocab_size
    total = 0.0
    for example in examples:
        length, predicting = len(example.input_ids), sum(label != -100 for label in example.labels[1:])
        total += (4 * n_linear + 6 * n_lora) * length + 6 * layers * width * length * (length + 1)
        total += 4 * vocab * width * predicting
    return total
