"""Where one training step's time goes: torch.profiler over a packed micro-batch of the bench's dolly
rows (the `paper` preset's first micro-batch of 8, sorted by length, as `benchmarks/bf16_paths.py`
takes it), forward and backward inside a `frozen_linears` block as local training runs it, eager or
with the decoder compiled (`--compiled`), in fp32 or under bf16 autocast (`--dtype`). Prints the
mean step time over `--steps` unprofiled steps, then the profiled step's self CPU time by kind of
op (attention kernels, GEMMs, compiled graphs, copies and casts, the rest) and its top ops.

    python benchmarks/step_profile.py --data ../shared/data/databricks-dolly-15k.jsonl --dtype bf16 [--compiled]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.bench.passes import sample_examples
from perfit.client import onednn
from perfit.client.batching import packed_batch
from perfit.client.data import load_rows
from perfit.client.loss import nll_sum
from perfit.client.model import attach_lora, compile_decoder, load_base, write_flat
from perfit.client.train import autocast
from perfit.config import make_config
from perfit.core.layout import initial_adapter

KINDS = {  # the first kind whose marker is in an op's name
    "attention": ("scaled_dot_product", "flash_attention"),
    "GEMMs": ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise"),
    "compiled graphs": ("CompiledFxGraph",),
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::fill_"),
}


def kind(name: str) -> str:
    return next((label for label, markers in KINDS.items() if any(m in name for m in markers)), "the rest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    config = make_config(None, "paper", data=args.data)
    base, tokenizer = load_base(resolve_model(config), shared=False)
    onednn.route(base, onednn.plan(config.onednn, "cpu"))  # as a run routes it
    if args.compiled:
        compile_decoder(base)
    rows, _ = sample_examples(load_rows(config.data), tokenizer, 48, config.cutoff_len)  # the bench's rows
    peft_model = attach_lora(base, config.rank, 2.0 * config.rank)
    write_flat(peft_model, initial_adapter(lora_layout(peft_model), "peft", 0))
    batch = packed_batch(sorted(rows[: config.micro_batch_size], key=lambda e: len(e.input_ids)))

    def step() -> None:
        with autocast(peft_model, dtype):
            loss, count = nll_sum(peft_model, batch)
        (loss / count).backward()

    with onednn.frozen_linears(peft_model, dtype):
        for _ in range(2):  # the block's copies, kernel choice, a compile
            step()
        begin = time.perf_counter()
        for _ in range(args.steps):
            step()
        mean = (time.perf_counter() - begin) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for event in events:
        by_kind[kind(event.key)] += event.self_cpu_time_total
    path = f"{args.dtype}, {'compiled' if args.compiled else 'eager'}"
    print(f"{path}: {batch['input_ids'].shape[1]} packed tokens, {mean:.3f} s a step (mean of {args.steps}); "
          f"profiled step {total / 1e6:.3f} s of self CPU time")  # fmt: skip
    for label, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {label}: {micros / total:.1%}")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {event.self_cpu_time_total / total:6.1%}  {event.count:5d} calls  {event.key[:70]}")


if __name__ == "__main__":
    main()
