"""`perfit bench speed` where the config's `device` is a GPU: local training's throughput
on the accelerator, measured side by side in one run and reported as ratios. The CPU bench
(`perfit.bench.speed.Bench`) stays what `perfit bench speed` runs on a machine without a GPU.

At the config's micro-batch and at a whole batch in one micro-batch (a GPU has room for it), on the
same seeded dolly rows, each pass one epoch of local training after a warm-up on the longest
micro-batch, its clock stopped once the device has finished:
  FIT      perfit's local training at rank r, in the layout the device runs (`batching.runs_packed`)
  PerFIT   rank r/(1-s) masked to the budget of rank r (search excluded), same layout
  layout   FIT in the other layout (packed where the device pads, padded where it packs)
  plain    the plain peft + torch loop (padded, full head, HF's loss) in the same precision
MFU counts useful FLOPs as the CPU bench does (`perfit.bench.flops.useful_flops`) against this device's
square-matmul peak in the training precision, measured at the start and at the end of the run.

The device needs no Flower and no dolly download: `benchmarks/device_kit.py` packs the model's
config, its tokenizer and the data file small enough to travel, and writes random weights of the
model's architecture there (throughput does not depend on the weights' values; the report says
when they are random, and then gives no perplexity).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.bench.flops import DTYPES, PRECISIONS, linear_params, matmul_peak_gflops, synchronize, useful_flops
from perfit.bench.passes import local_pass, plain_peft_pass, sample_examples
from perfit.client import onednn
from perfit.client.batching import runs_packed
from perfit.client.data import load_rows
from perfit.client.hardware import cpu_description, training_autocast
from perfit.client.model import attach_lora, load_base, resolve_device
from perfit.config import Config

RANDOM_WEIGHTS = "RANDOM_WEIGHTS"
"""A file in a model directory whose weights are random (`benchmarks/device_kit.py`): its text says so."""


def weights_note(model_path: str) -> str | None:
    """What the model directory's `RANDOM_WEIGHTS` file says (None: the weights are as trained)."""
    marker = Path(model_path) / RANDOM_WEIGHTS
    return marker.read_text().strip() if marker.is_file() else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's description."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory the device's allocator has held since the last `reset_peak_memory` (GPU only)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _timed(run: Any, train: list[Any], micro: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak device memory) of `run(train)`, after a warm-up on the longest micro-batch
    (kernel choice, allocator pools), the clock stopped once the device has finished."""
    run(sorted(train, key=lambda e: len(e.input_ids))[-micro:])
    synchronize(device)
    reset_peak_memory(device)
    begin = time.perf_counter()
    run(train)
    synchronize(device)
    return time.perf_counter() - begin, peak_memory_gib(device)


def _packed_over_padded(default_seconds: float, other_seconds: float, default_packed: bool) -> float:
    """Packed micro-batches' tokens/s over padded ones', from the default layout's pass and the other's."""
    return other_seconds / default_seconds if default_packed else default_seconds / other_seconds


@dataclass
class DeviceBench:
    config: Config
    rows: int = 512
    """Dolly rows in each timed pass (seeded sample of the file): 64 micro-batches of 8."""
    peak_size: int | None = None
    """Side of the square matmuls timed for the peak (default: 8192 on a GPU, 1024 elsewhere)."""
    peak_seconds: float = 2.0
    """Timing budget of each peak reading (one per precision at the start and at the end)."""

    def run(self) -> dict[str, Any]:
        """Every figure of the device bench, timed side by side in this process: the passes at the
        config's micro-batch and at its whole batch, their ratios, MFU and peak device memory."""
        torch.manual_seed(0)
        config, started = self.config, time.perf_counter()
        device = resolve_device(config.device)
        used = "bf16" if training_autocast(config.dtype, device) else "fp32"
        size = self.peak_size or (8192 if device.type == "cuda" else 1024)
        peak_at_start = {name: matmul_peak_gflops(DTYPES[name], size, self.peak_seconds, device) for name in PRECISIONS}
        model_path = resolve_model(config)
        base, tokenizer = load_base(model_path, shared=False, device=device)
        onednn.route(base, onednn.plan(config.onednn, device.type))  # as a run routes it (oneDNN on a CPU only)
        train, _ = sample_examples(load_rows(config.data), tokenizer, self.rows, config.cutoff_len)
        pad, autocast = tokenizer.pad_token_id, DTYPES[used] if used != "fp32" else None
        tokens = sum(len(e.input_ids) for e in train)
        probe = attach_lora(base, config.rank, 2.0 * config.rank)
        flops = useful_flops(base.config, linear_params(base), lora_layout(probe).size, train)
        default_packed = runs_packed(probe)  # the layout local training runs on this device
        dense = round(config.rank / (1 - config.sparsity))
        seconds: dict[str, float] = {}
        memory: dict[str, float | None] = {}
        micros = sorted({config.micro_batch_size, config.batch_size})
        for micro in micros:
            taken, peaks = self._passes_at(micro, base, train, pad, autocast, dense, default_packed, device)
            seconds |= taken
            memory |= peaks
        peak_at_end = {name: matmul_peak_gflops(DTYPES[name], size, self.peak_seconds, device) for name in PRECISIONS}
        peak = {name: max(peak_at_start[name], peak_at_end[name]) for name in PRECISIONS}

        return {
            "device": {"type": device.type, "name": device_name(device), "torch": torch.__version__},
            "model": {"path": model_path, "random_weights": weights_note(model_path)},
            "dtype": used,
            "rows": self.rows,
            "micro_batches": micros,
            "default_layout": "packed" if default_packed else "padded",
            "tokens_per_pass": tokens,
            "useful_gflop_per_pass": flops / 1e9,
            "peak_gflops": peak,
            "peak_gflops_at_start_and_end": {name: [peak_at_start[name], peak_at_end[name]] for name in PRECISIONS},
            "seconds": seconds,
            "tokens_per_s": {key: tokens / value for key, value in seconds.items()},
            "mfu": {key: flops / value / (peak[used] * 1e9) for key, value in seconds.items()},
            "perfit_over_peft_tokens_per_s": {str(m): seconds[f"plain_peft_{m}"] / seconds[f"fit_{m}"] for m in micros},
            "perfit_round_over_fit_round": {str(m): seconds[f"perfit_{m}"] / seconds[f"fit_{m}"] for m in micros},
            "packed_over_padded_tokens_per_s": {
                str(m): _packed_over_padded(seconds[f"fit_{m}"], seconds[f"fit_{m}_other_layout"], default_packed)
                for m in micros
            },
            "peak_device_memory_gib": memory,
            "bench_seconds": time.perf_counter() - started,
        }

    def _passes_at(
        self,
        micro: int,
        base: Any,
        train: list[Any],
        pad: int,
        autocast: torch.dtype | None,
        dense: int,
        default_packed: bool,
        device: torch.device,
    ) -> tuple[dict[str, float], dict[str, float | None]]:
        """At micro-batches of `micro` rows: FIT and PerFIT (dense rank, masked to the budget), FIT in the
        other layout (packed or padded) and plain peft, each pass's (seconds, peak device memory) by name."""
        config = self.config
        seconds: dict[str, float] = {}
        memory: dict[str, float | None] = {}

        def trainer(rank: int, packed: bool = default_packed) -> Any:
            return local_pass(base, config, pad, rank, config.rank, autocast, packed, micro)[2]

        def timed(run: Any) -> tuple[float, float | None]:
            return _timed(run, train, micro, device)

        # FIT, PerFIT, PerFIT, FIT: a drift of the device's clocks over the passes cancels in the ratio
        passes: dict[str, list[float]] = {"fit": [], "perfit": []}
        for rank, label in ((config.rank, "fit"), (dense, "perfit"), (dense, "perfit"), (config.rank, "fit")):
            took, memory[f"{label}_{micro}"] = timed(trainer(rank))
            passes[label].append(took)
        for label, values in passes.items():
            seconds[f"{label}_{micro}"] = statistics.fmean(values)
        other = f"fit_{micro}_other_layout"
        seconds[other], memory[other] = timed(trainer(config.rank, packed=not default_packed))
        plain = attach_lora(base, config.rank, 2.0 * config.rank)
        seconds[f"plain_peft_{micro}"], memory[f"plain_peft_{micro}"] = timed(
            lambda subset: plain_peft_pass(plain, subset, pad, config.batch_size, micro, autocast)
        )
        return seconds, memory


def rate(gflops: float) -> str:
    """A FLOP rate in the unit that reads best: TFLOP/s from 1,000 GFLOP/s (a GPU's), else GFLOP/s."""
    return f"{gflops / 1e3:,.1f} TFLOP/s" if gflops >= 1e3 else f"{gflops:,.0f} GFLOP/s"


def device_report_markdown(result: dict[str, Any], command: str) -> str:
    """The device bench's report: each figure from `DeviceBench.run`'s result, nothing else."""
    used, device = result["dtype"], result["device"]
    lines = [
        f"# perfit bench speed on {device['name']}",
        "",
        f"Command: `{command}`. torch {device['torch']}; {result['rows']} dolly rows a pass "
        f"({result['tokens_per_pass']:,} tokens, {result['useful_gflop_per_pass']:.0f} useful GFLOP), "
        f"{used}; the device's square-matmul peak {rate(result['peak_gflops'][used])} in {used} "
        f"(fp32 {rate(result['peak_gflops']['fp32'])}), the higher of the readings at the start and the "
        f"end. MFU counts rank r's useful FLOPs for every pass. Local training runs "
        f"{result['default_layout']} micro-batches here. "
        f"Bench wall time {result['bench_seconds']:.0f} s.",
        "",
    ]
    if result["model"]["random_weights"]:
        lines += [f"Weights: {result['model']['random_weights']}", ""]
    lines += ["| micro-batch | pass | tokens/s | MFU | peak device memory |", "|---|---|---|---|---|"]
    other = "padded" if result["default_layout"] == "packed" else "packed"
    passes = {
        "fit_{}": "perfit, FIT (rank r)",
        "perfit_{}": "perfit, PerFIT (rank r/(1-s) masked to r's budget)",
        "fit_{}_other_layout": f"perfit, FIT, {other} micro-batches",
        "plain_peft_{}": "plain peft + torch loop",
    }
    for micro in result["micro_batches"]:
        for pattern, label in passes.items():
            key = pattern.format(micro)
            gib = result["peak_device_memory_gib"].get(key)
            lines.append(
                f"| {micro} | {label} | {result['tokens_per_s'][key]:,.0f} | {result['mfu'][key]:.2%} | "
                f"{'' if gib is None else f'{gib:.2f} GiB'} |"
            )
    lines += ["", "| ratio | " + " | ".join(f"micro-batch {m}" for m in result["micro_batches"]) + " |",
              "|---|" + "---|" * len(result["micro_batches"])]  # fmt: skip
    for title, key in (("perfit / plain peft tokens/s", "perfit_over_peft_tokens_per_s"),
                       ("PerFIT round / FIT round", "perfit_round_over_fit_round"),
                       ("packed / padded tokens/s", "packed_over_padded_tokens_per_s")):  # fmt: skip
        lines.append(f"| {title} | " + " | ".join(f"{result[key][str(m)]:.2f}" for m in result["micro_batches"]) + " |")
    return "\n".join(lines) + "\n"
