"""`perfit.client.train.packed_attention` (the packed row split into its sequences) against one slice per
sequence, forward and backward of one layer's attention at SmolLM2-135M's heads (9 query heads, 3
key/value heads of 64) on a packed row of `--lengths`, timed alternately in one process, and their
gradients compared. A slice's backward zero-fills a full-length gradient per sequence and adds them
up; split's backward concatenates the pieces once.

    python benchmarks/packed_attention.py
"""

from __future__ import annotations

import argparse
import itertools
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from perfit.client.batching import packed_attention


def sliced(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """One slice per sequence (what packed_attention did before it split the row)."""
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, enable_gqa=True
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="150,210,180,240,160,200,222,190")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    bounds = [0, *itertools.accumulate(lengths)]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, heads, bounds[-1], 64, generator=generator) for heads in (9, 3, 3)]
    upstream = torch.randn(1, bounds[-1], 9, 64, generator=generator)
    cu = torch.tensor(bounds, dtype=torch.int32)
    paths = {
        "split": lambda q, k, v: packed_attention(SimpleNamespace(), q, k, v, None, cu_seq_lens_q=cu)[0],
        "slices": lambda q, k, v: sliced(q, k, v, bounds),
    }

    def step(name: str) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in inputs]
        paths[name](*leaves).backward(upstream)
        return [leaf.grad for leaf in leaves]

    grads = {name: step(name) for name in paths}
    difference = max((a - b).abs().max().item() for a, b in zip(*grads.values(), strict=True))
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name in paths if repeat % 2 == 0 else reversed(paths):
            begin = time.perf_counter()
            for _ in range(10):
                step(name)
            seconds[name].append((time.perf_counter() - begin) / 10)
    best = {name: min(values) * 1e3 for name, values in seconds.items()}
    print(f"{len(lengths)} sequences, {bounds[-1]} tokens, {torch.get_num_threads()} threads")
    timing = f"split {best['split']:.2f}, slices {best['slices']:.2f}"
    print(f"ms per layer, forward + backward (best of {args.repeats}): {timing}")
    print(f"slices / split: {best['slices'] / best['split']:.3f}; largest gradient difference {difference:.1e}")


if __name__ == "__main__":
    main()
