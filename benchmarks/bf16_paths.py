"""Local training under bf16 autocast with the frozen GEMMs through oneDNN's bf16 copies of their
weights (`onednn=1`) against autocast's own matmuls (`onednn=0`: a cast of each weight at every call,
plain-layout oneDNN calls), and the vocabulary head's variants, side by side in one process (a CPU
with bf16 units; about 6 min on 2 cores).

1. Steps: one micro-batch of the bench's dolly rows (the `paper` preset's micro-batch and cutoff,
   packed), forward and backward, each path inside its own `frozen_linears` block (as a client's
   local epoch runs: the copies are made once for the block, in the first, untimed step); the paths
   in a seeded random order every round, two timed steps each; the ratio of each round's pair.
2. The head: `client.loss.head_nll` over 600 target rows of SmolLM2's shape, 256- or `head_chunk`-row
   chunks, the head cast to bf16 in every call or its copy made once.

    python benchmarks/bf16_paths.py --data ../shared/data/databricks-dolly-15k.jsonl
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time

import torch

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.bench.passes import sample_examples
from perfit.client import onednn
from perfit.client.allocator import keep_freed_memory
from perfit.client.batching import packed_batch
from perfit.client.data import load_rows
from perfit.client.loss import head_chunk, head_nll, nll_sum
from perfit.client.model import attach_lora, load_base, write_flat
from perfit.client.train import autocast
from perfit.config import make_config
from perfit.core.layout import initial_adapter


def steps(data: str, rounds: int) -> None:
    config = make_config(None, "paper", data=data)
    base, tokenizer = load_base(resolve_model(config), shared=False)
    rows, _ = sample_examples(load_rows(config.data), tokenizer, 48, config.cutoff_len)  # the bench's
    peft_model = attach_lora(base, config.rank, 2.0 * config.rank)
    write_flat(peft_model, initial_adapter(lora_layout(peft_model), "peft", 0))
    batch = packed_batch(sorted(rows[: config.micro_batch_size], key=lambda e: len(e.input_ids)))

    def step() -> float:
        with autocast(peft_model, torch.bfloat16):
            loss, count = nll_sum(peft_model, batch)
        (loss / count).backward()
        return loss.item()

    seconds: dict[bool, list[float]] = {True: [], False: []}
    order = random.Random(0)
    for _ in range(rounds):
        paths = [True, False]
        order.shuffle(paths)
        for routed in paths:
            onednn.route(base, onednn.Routing(enabled=routed, fp32=True))
            with onednn.frozen_linears(peft_model, torch.bfloat16):
                loss = step()  # makes the block's copies
                begin = time.perf_counter()
                step(), step()
                seconds[routed].append((time.perf_counter() - begin) / 2)
            print(f"onednn={int(routed)}: {seconds[routed][-1]:.3f} s a step, loss {loss:.6f}", flush=True)
    ratios = sorted(b / a for a, b in zip(seconds[True], seconds[False], strict=True))
    print(f"steps, autocast's matmuls / oneDNN bf16 copies, {rounds} paired rounds: "
          f"median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")  # fmt: skip


def head(repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(576, 49_152, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.randn(49_152, 576, generator=generator) * 0.02)
    hidden = torch.randn(600, 576, generator=generator, requires_grad=True)
    targets = torch.randint(0, 49_152, (600,), generator=generator)
    copy = linear.weight.to(torch.bfloat16)
    chunk = head_chunk(49_152)
    variants = {
        "256 rows, cast every call": (256, None),
        f"{chunk} rows, cast every call": (chunk, None),
        f"{chunk} rows, one bf16 copy": (chunk, copy),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    faults = dict.fromkeys(variants, 0)

    def call(rows: int, weight: torch.Tensor | None) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total = head_nll(linear, hidden, targets, chunk=rows, weight=weight)
        total.backward()

    for _ in range(repeats):
        for name, (rows, weight) in variants.items():
            call(rows, weight)  # this variant's heap and kernels
            before, begin = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            call(rows, weight)
            seconds[name].append(time.perf_counter() - begin)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for name in variants:
        print(f"head, {name}: median {statistics.median(seconds[name]) * 1e3:.0f} ms a call, "
              f"{faults[name] / repeats:.0f} page faults a call")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    if not onednn.bf16_supported():
        raise SystemExit("this CPU has no bf16 units: oneDNN and torch would emulate bf16 (see docs/performance.md)")
    keep_freed_memory()  # as a training process runs (`load_base` sets it too)
    head(args.repeats)
    steps(args.data, args.rounds)


if __name__ == "__main__":
    main()
