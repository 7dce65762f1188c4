"""Causal attention kernels for one layer of SmolLM2-135M (9 query heads, 3 key/value heads of 64),
forward and backward at single-sequence `--lengths`, side by side in one process: torch's CPU flash
kernel in fp32 (what `perfit.client.train.packed_attention` runs, also under bf16 autocast), a materialised
fp32 attention with the key/value groups folded into batched matmuls and its own backward (the
probabilities kept from the forward), the same flash kernel in bf16, and a materialised bf16
attention (bf16 matmuls, fp32 softmax), eager and compiled (inductor, dynamic lengths); the bf16
kernels only on a CPU with bf16 units (elsewhere torch emulates them). Best of `--repeats`, the
kernels in a rotating order; useful GFLOP/s count causal attention as `perfit bench speed` does
(6 x width x n(n+1) a layer, forward and backward). The materialised fp32 kernel's output and
gradients are checked against flash's first.

    python benchmarks/attention_kernels.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from perfit.client import onednn

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


def materialised(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v with the scores in fp32."""
    length, groups = query.shape[2], HEADS // KV_HEADS
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * HEAD_DIM**-0.5
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1).to(query.dtype) @ value


class FoldedAttention(torch.autograd.Function):
    """Causal softmax(q k^T / sqrt(d)) v with each key/value head's query group stacked into the rows
    of one batched matmul (3 batches of 3n x 64 against n x 64: no repeated keys), fp32, the
    probabilities kept for a backward of four batched matmuls."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        length, groups = query.shape[2], HEADS // KV_HEADS
        rows = query.reshape(KV_HEADS, groups * length, HEAD_DIM)
        keys, values = key.reshape(KV_HEADS, length, HEAD_DIM), value.reshape(KV_HEADS, length, HEAD_DIM)
        causal = torch.full((length, length), float("-inf")).triu(1).repeat(groups, 1)  # row r: position r % n
        probs = torch.baddbmm(causal, rows, keys.transpose(1, 2), alpha=HEAD_DIM**-0.5).softmax(-1)
        out = torch.bmm(probs, values)
        ctx.save_for_backward(rows, keys, values, out, probs)
        ctx.shapes = query.shape, key.shape
        return out.view(query.shape)

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, keys, values, out, probs = ctx.saved_tensors
        up = upstream.reshape(out.shape)
        d_values = torch.bmm(probs.transpose(1, 2), up)
        d_scores = torch.bmm(up, values.transpose(1, 2)).sub_((up * out).sum(-1, keepdim=True)).mul_(probs)
        d_rows = torch.bmm(d_scores, keys).mul_(HEAD_DIM**-0.5)
        d_keys = torch.bmm(d_scores.transpose(1, 2), rows).mul_(HEAD_DIM**-0.5)
        query_shape, key_shape = ctx.shapes
        return d_rows.view(query_shape), d_keys.view(key_shape), d_values.view(key_shape)


def folded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return FoldedAttention.apply(query, key, value)


def inputs(length: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random query, key and value leaves of one sequence of `length` tokens, and an upstream gradient."""
    shapes = ((1, HEADS, length, HEAD_DIM), (1, KV_HEADS, length, HEAD_DIM), (1, KV_HEADS, length, HEAD_DIM))
    leaves = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]
    return leaves, torch.randn(1, HEADS, length, HEAD_DIM, generator=generator).to(dtype)


def check_folded(length: int, generator: torch.Generator) -> float:
    """The largest difference of the folded kernel's output and gradients from flash's."""
    leaves, upstream = inputs(length, torch.float32, generator)
    results = []
    for kernel in (flash, folded):
        out = kernel(*leaves)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, upstream)])
    return max((a - b).abs().max().item() for a, b in zip(*results, strict=True))


def seconds(kernel: Attention, length: int, dtype: torch.dtype, generator: torch.Generator) -> Callable[[], float]:
    """A timer of one forward and backward of `kernel` at `length` tokens in `dtype`."""
    leaves, upstream = inputs(length, dtype, generator)

    def run() -> float:
        begin = time.perf_counter()
        kernel(*leaves).backward(upstream)
        return time.perf_counter() - begin

    run()  # kernel choice, and a compile for a new length
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="54,135,238,324,512")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    kernels = {"flash fp32": (flash, torch.float32), "materialised fp32, folded": (folded, torch.float32)}
    if onednn.bf16_supported():
        compiled = torch.compile(materialised, dynamic=True)
        kernels |= {
            "flash bf16": (flash, torch.bfloat16),
            "materialised bf16": (materialised, torch.bfloat16),
            "compiled materialised bf16": (compiled, torch.bfloat16),
        }
    else:
        print("no bf16 units: torch would emulate the bf16 kernels, fp32 only")
    generator = torch.Generator().manual_seed(0)
    error = max(check_folded(length, generator) for length in (54, 200))
    print(f"folded vs flash, output and gradients at 54 and 200 tokens: max difference {error:.1e}")
    if error > 1e-4:
        raise SystemExit("the folded kernel disagrees with flash")
    print(f"{torch.get_num_threads()} threads; ms a layer, forward + backward (best of {args.repeats}), "
          "useful GFLOP/s, and flash fp32's time over each kernel's")  # fmt: skip
    for length in (int(n) for n in args.lengths.split(",")):
        timers = {name: seconds(kernel, length, dtype, generator) for name, (kernel, dtype) in kernels.items()}
        best = dict.fromkeys(timers, float("inf"))
        names = list(timers)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                best[name] = min(best[name], timers[name]())
        flops = 6 * HEADS * HEAD_DIM * length * (length + 1)
        cells = ", ".join(
            f"{name} {best[name] * 1e3:.2f} ms {flops / best[name] / 1e9:.0f} GFLOP/s "
            f"({best['flash fp32'] / best[name]:.2f}x)"
            for name in names
        )
        print(f"{length} tokens: {cells}", flush=True)


if __name__ == "__main__":
    main()
