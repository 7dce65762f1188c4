"""Eager training with the frozen GEMMs through oneDNN (`onednn=1`), eager on torch's default BLAS
(`onednn=0`) and the compiled decoder (`torch_compile=1`, torch's BLAS inside its graphs), side by
side: FIT passes over the bench's dolly rows (the `paper` preset's batch, micro-batch and cutoff;
packed micro-batches), timed in the order A B C C B A `--repeats` times in one process so that a
drift of the machine's speed cancels, with each pass's seconds and loss (about 15 min on 2 cores).
`perfit bench speed` times each path once; this script is the repeated check behind
`torch_compile=auto`'s choice. `--dtype bf16` (a CPU with bf16 units) runs the passes under bf16
autocast: oneDNN's bf16 copies of the frozen weights, autocast's own matmuls (`onednn=0`), and the
compiled decoder (autocast's matmuls inside its graphs).

    python benchmarks/gemm_paths.py --data ../shared/data/databricks-dolly-15k.jsonl [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.bench.passes import sample_examples
from perfit.client import onednn
from perfit.client.data import load_rows
from perfit.client.model import attach_lora, compile_decoder, load_base
from perfit.client.train import Schedule, TrainResult, train_masked
from perfit.config import make_config
from perfit.core.layout import initial_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    if autocast_dtype is not None and not onednn.bf16_supported():
        raise SystemExit("this CPU has no bf16 units: torch would emulate bf16 matmuls (see docs/performance.md)")
    config = make_config(None, "paper", data=args.data)
    path = resolve_model(config)
    eager, tokenizer = load_base(path, shared=False)
    compiled, _ = load_base(path, shared=False)
    compile_decoder(compiled)
    rows, _ = sample_examples(load_rows(config.data), tokenizer, args.rows, config.cutoff_len)  # the bench's
    longest = sorted(rows, key=lambda e: len(e.input_ids))[-config.micro_batch_size :]
    models = {"onednn": (eager, True), "blas": (eager, False), "compiled": (compiled, False)}

    def one_pass(name: str, examples: list) -> TrainResult:
        model, routed = models[name]
        onednn.route(model, onednn.Routing(enabled=routed, fp32=True))
        peft_model = attach_lora(model, config.rank, 2.0 * config.rank)
        layout = lora_layout(peft_model)
        start = initial_adapter(layout, "peft", 0)
        return train_masked(peft_model, start, torch.ones(layout.size, dtype=torch.bool), examples,
                            tokenizer.pad_token_id, Schedule.of(config, epochs=1),
                            autocast_dtype=autocast_dtype)  # fmt: skip

    for name in models:  # compiles, and brings each path's heap and kernels to their steady state
        one_pass(name, rows[:8])
        one_pass(name, longest)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    order = [*models, *reversed(models)] * args.repeats
    for name in order:
        begin = time.perf_counter()
        result = one_pass(name, rows)
        seconds[name].append(time.perf_counter() - begin)
        print(f"{name}: {seconds[name][-1]:.1f} s, loss {result.loss:.6f}", flush=True)
    mean = {name: statistics.fmean(values) for name, values in seconds.items()}
    plain = "BLAS" if autocast_dtype is None else "autocast's matmuls"  # the `onednn=0` path
    ratios = {f"oneDNN / {plain}": ("blas", "onednn"), "compiled / oneDNN": ("onednn", "compiled"),
              f"compiled / {plain}": ("blas", "compiled")}  # fmt: skip
    text = ", ".join(f"{label} {mean[slow] / mean[fast]:.3f}" for label, (slow, fast) in ratios.items())
    print(f"{args.dtype} tokens/s over {len(order)} passes (A B C C B A): {text}")


if __name__ == "__main__":
    main()
