"""`perfit bench speed`: what local training costs on this machine, measured side by side in one
run and reported as ratios. Every figure is timed here; nothing is taken from elsewhere.
Peaks, GEMM rates and the useful FLOPs MFU counts: `perfit.bench.flops`.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.bench.flops import (
    DTYPES,
    PRECISIONS,
    autocast_for,
    emulated_bf16_probe,
    gemm_ceiling,
    linear_params,
    matmul_peak_gflops,
    useful_flops,
)
from perfit.bench.passes import TimedPasses, plain_peft_pass, random_mask, sample_examples
from perfit.bench.search_cost import search_cost
from perfit.client import onednn
from perfit.client.data import load_rows, partition
from perfit.client.hardware import cpu_description, cpu_has_bf16, training_autocast
from perfit.client.model import attach_lora, compile_decoder, load_base
from perfit.config import Config
from perfit.core.aggregate import Accumulator


def rotated(base: torch.Tensor, client: int) -> torch.Tensor:
    """Client `client`'s copy of a random mask or update for timing Eq. 6 on the server: `base` rotated
    by client x 7,919 positions (a prime: the shifts differ for every client below the size unless
    7,919 divides it), so each client's mask has the same budget and its own pattern, far faster
    than a randperm per client."""
    return torch.roll(base, shifts=client * 7919 % base.numel())


@dataclass
class Bench:
    config: Config
    rows: int = 48
    """Dolly rows timed in each training pass (seeded sample of the whole file); half as many more are
    the held-out rows of the perplexity ratios."""
    bf16: bool | None = None
    """Time the bf16 autocast passes beside fp32. None: where the CPU has bf16 units (`cpu_has_bf16`)
    or the config trains in bf16. Without the units torch emulates bf16 matmuls, far slower than
    fp32 (`emulated_bf16_probe`), so the passes would take hours and `dtype=auto` never uses them."""

    def run(self) -> dict[str, Any]:
        """Every figure of `perfit bench speed`, timed side by side in this process: the training
        passes, their ratios and perplexities, payload bytes and Eq. 6 on the server, the search's
        share, a compiled pass, and MFU against the machine's peak."""
        torch.manual_seed(0)
        config = self.config
        started = time.perf_counter()
        used = "bf16" if training_autocast(config.dtype) else "fp32"  # what local training uses here
        with_bf16 = used == "bf16" or (cpu_has_bf16() if self.bf16 is None else self.bf16)
        precisions = PRECISIONS if with_bf16 else ("fp32",)
        peak_at_start = {name: matmul_peak_gflops(DTYPES[name]) for name in precisions}
        all_rows = load_rows(config.data)
        base, tokenizer = load_base(resolve_model(config), shared=False)  # compiled at the end
        # the GEMMs as local training runs them: fp32 through oneDNN on all but Intel CPUs
        routing = onednn.plan(config.onednn, "cpu")
        onednn.route(base, routing)
        # half as many held-out rows: they only compare two adapters trained alike (ratios near 1.0000),
        # and the bench evaluates four adapters
        train, held_out = sample_examples(all_rows, tokenizer, self.rows, config.cutoff_len, max(self.rows // 2, 1))
        tokens = sum(len(e.input_ids) for e in train)
        ceiling = gemm_ceiling(base, train, config, precisions=precisions)
        n_linear, n_lora = linear_params(base), lora_layout(attach_lora(base, config.rank, 2.0 * config.rank)).size
        flops = useful_flops(base.config, n_linear, n_lora, train)
        evaluator = attach_lora(load_base(resolve_model(config))[0], config.rank, 2.0 * config.rank)
        passes = TimedPasses(config, base, tokenizer.pad_token_id, train, held_out, evaluator)
        dense = round(config.rank / (1 - config.sparsity))
        seconds, round_passes, other, blas_bf16 = self._timed_passes(passes, precisions, used, dense, routing.enabled)
        # the search share's training side: the PerFIT passes above, where they ran at the training precision
        dense_seconds = seconds["perfit_round_dense_rank"] if used == "fp32" else None
        result = {
            "machine": {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "dtype": used,
            "precisions": list(precisions),
            "gemm_at_model_shapes": dict(ceiling),
            "tokens_per_pass": tokens,
            "useful_gflop_per_pass": flops / 1e9,
            "seconds": seconds,
            "tokens_per_s": {k: tokens / v for k, v in seconds.items()},
            "packing_dtype": used,
            "packed_over_padded_tokens_per_s": seconds[f"perfit_{used}_padded"] / seconds[f"perfit_{used}"],
            "packed_ppl_over_padded_ppl": passes.trained_ppl(used) / passes.held_out_ppl(passes.trained["padded"].flat),
            "perfit_over_peft_tokens_per_s": seconds["plain_peft_fp32"] / seconds["perfit_fp32"],
            "perfit_round_over_fit_round": seconds["perfit_round_dense_rank"] / seconds["perfit_fp32"],
            "round_passes_seconds": round_passes,
            "onednn": {"used": routing.enabled, "fp32_default": "onednn" if routing.fp32 else "blas"},
            **self._bytes_and_server(dense),
            **search_cost(config, passes, dense, partition(all_rows, config), precisions, dense_seconds),
        }
        result["onednn"] |= _path_ratios(passes, seconds, other, blas_bf16, routing.fp32)
        result |= _bf16_ratios(passes, seconds) if with_bf16 else {"bf16_not_timed": emulated_bf16_probe()}
        # last: compiling the decoder is process-wide, so everything above ran eager. Only at the training
        # precision (`torch_compile=auto` compiles that path alone): an fp32 compile on a bf16 CPU would
        # time a path `dtype=auto` does not take there
        result["compiled"] = self._compiled(passes, {used: seconds[f"perfit_{used}"]}, passes.trained_ppl(used))
        # the peak again: these machines are shared, and MFU is taken against the higher reading
        peak_at_end = {name: matmul_peak_gflops(DTYPES[name]) for name in precisions}
        result |= _mfu(result, flops, precisions, peak_at_start, peak_at_end)
        # the bench process (model copies and timing loops), not a simulation run (see `perfit bench scale`)
        result["bench_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["bench_seconds"] = time.perf_counter() - started
        return result

    def _timed_passes(
        self, passes: TimedPasses, precisions: tuple[str, ...], used: str, dense: int, with_onednn: bool
    ) -> tuple[dict[str, float], dict[str, list[float]], tuple[float, Any] | None, tuple[float, Any] | None]:
        """The timed training passes: (seconds by name, the round ratio's passes, the fp32 pass on the
        other frozen-GEMM path, the bf16 pass on autocast's own matmuls). Each precision's perfit pass
        is kept in `passes.trained`, the padded one as "padded"."""
        config, timed, masked = self.config, passes.timed, passes.masked
        seconds: dict[str, float] = {}
        # a PerFIT client (dense rank, masked to the budget) against FIT, and FIT on the other path for the
        # frozen GEMMs (torch's BLAS where they go through oneDNN, else oneDNN), timed FIT, PerFIT,
        # other, PerFIT, FIT so that a drift of this shared machine's speed over the five passes cancels
        fit_first, passes.trained["fp32"] = timed(masked(config.rank, config.rank)[2])
        round_passes = {"perfit": [timed(masked(dense, config.rank)[2], warm=False)[0]]}
        other = self._other_path_pass(passes.base, masked(config.rank, config.rank)[2], timed, "fp32", with_onednn)
        dense_again = masked(dense, config.rank)[2]  # anew: the other pass's wrap replaced the first
        round_passes["perfit"].append(timed(dense_again, warm=False)[0])
        round_passes["fit"] = [fit_first, timed(masked(config.rank, config.rank)[2], warm=False)[0]]
        seconds["perfit_fp32"] = statistics.fmean(round_passes["fit"])
        seconds["perfit_round_dense_rank"] = statistics.fmean(round_passes["perfit"])
        blas_bf16 = None
        for name in precisions:
            dtype = autocast_for(name)
            if name != "fp32":
                first, passes.trained[name] = timed(masked(config.rank, config.rank, dtype)[2])
                timings = [first]
                if name == "bf16" and with_onednn and onednn.bf16_supported():  # oneDNN, autocast's, oneDNN
                    blas_bf16 = self._other_path_pass(passes.base, masked(config.rank, config.rank, dtype)[2],
                                                      timed, name, True)  # fmt: skip
                    timings.append(timed(masked(config.rank, config.rank, dtype)[2], warm=False)[0])
                    round_passes["bf16_onednn"] = timings
                seconds[f"perfit_{name}"] = statistics.fmean(timings)
            plain_model = masked(config.rank, config.rank)[0]
            seconds[f"plain_peft_{name}"], _ = timed(
                lambda subset, model=plain_model, dtype=dtype: plain_peft_pass(
                    model, subset, passes.pad, config.batch_size, config.micro_batch_size, dtype
                )
            )
        seconds[f"perfit_{used}_padded"], passes.trained["padded"] = timed(
            masked(config.rank, config.rank, autocast_for(used), packed=False)[2]
        )
        return seconds, round_passes, other, blas_bf16

    @staticmethod
    def _other_path_pass(
        base: Any, run_pass: Any, timed: Any, precision: str, with_onednn: bool
    ) -> tuple[float, Any] | None:
        """(seconds, result) of a FIT pass (`run_pass`, fp32 or under bf16 autocast) on the frozen-GEMM
        path the bench's other passes of `precision` do not take: torch's own matmuls where those run
        through oneDNN's copies (`onednn=0`: its default BLAS in fp32, autocast's casts and plain-layout
        oneDNN calls in bf16), oneDNN's fp32 copies where fp32 is left to torch's BLAS (`onednn=1` on
        an Intel CPU); None where the bench uses no oneDNN (`onednn=0`, or a build without the ops)."""
        if not with_onednn:
            return None
        routing = onednn.routing_of(base)
        onednn.route(base, onednn.Routing(enabled=precision == "fp32" and not routing.fp32, fp32=True))
        try:
            return timed(run_pass, warm=False)
        finally:
            onednn.route(base, routing)

    def _compiled(self, passes: TimedPasses, eager_seconds: dict[str, float], eager_ppl: float) -> dict[str, Any]:
        """The same perfit pass with the decoder compiled (`torch_compile=1`), in the precision of
        `eager_seconds` (the training precision): first-call cost (compile + one micro-batch), pass
        seconds, and personalized perplexity after the compiled pass against the eager one
        (`eager_ppl`, of the eager pass: same start, rows, seed and precision). Both adapters are
        evaluated the same way, on the eager copy of the model (`passes.held_out_ppl`): compiling the
        no-grad graph as well would cost the bench minutes and measure nothing about training."""
        compile_decoder(passes.base)
        train = passes.train
        first_call, seconds, flats = {}, {}, {}
        for name in eager_seconds:
            _, _, run_pass = passes.masked(self.config.rank, self.config.rank, autocast_for(name))
            begin = time.perf_counter()
            run_pass(train[:8])  # compiles this dtype's training graph
            first_call[name] = time.perf_counter() - begin
            run_pass(train[8:16])  # a second shape: dynamic dimensions settle here, not in the timing
            begin = time.perf_counter()
            flats[name] = run_pass(train).flat
            seconds[name] = time.perf_counter() - begin
        return {
            "first_call_seconds": first_call,
            "seconds": seconds,
            **{f"compiled_over_eager_tokens_per_s_{name}": eager_seconds[name] / seconds[name] for name in seconds},
            **{f"ppl_compiled_over_eager_{name}": passes.held_out_ppl(flats[name]) / eager_ppl for name in flats},
        }

    def _bytes_and_server(self, dense: int) -> dict[str, Any]:
        """Payload bytes as Flower counts them, and Eq. 6 over k masked clients on the server."""
        from flwr.app import Array, ArrayRecord

        from perfit.artifacts.lora import layout_for
        from perfit.core.masks import encode

        config = self.config
        layout = layout_for(resolve_model(config), dense, 2.0 * dense)
        budget = layout.budget(config.rank)
        values = ArrayRecord({"values": Array(np.zeros(budget, dtype=np.float32))}).count_bytes()
        mask = torch.zeros(layout.size, dtype=torch.bool)
        mask[:budget] = True
        mask_bytes = ArrayRecord({"mask": Array(encode(mask))}).count_bytes()
        participations = config.rounds * config.clients_per_round / config.num_clients
        aggregation = {}
        base_mask = random_mask(layout.size, budget, seed=0)
        base_update = torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
        for clients in (10, 100, 1000):  # streamed: the server never holds a round's updates at once
            accumulator, seconds = Accumulator("shared", layout.size), 0.0
            for client in range(clients):
                m = rotated(base_mask, client)
                update = rotated(base_update, client) * m
                begin = time.perf_counter()
                accumulator.add(m, update, 10.0)
                seconds += time.perf_counter() - begin
            begin = time.perf_counter()
            accumulator.result(torch.zeros(layout.size))
            aggregation[str(clients)] = seconds + time.perf_counter() - begin
        return {
            "bytes": {"values_per_round": values, "perfit_mask_once": mask_bytes},
            "upload_bytes_perfit_over_fit": (values + mask_bytes / participations) / values,
            "upload_bytes_perfit_over_fit_first_round": (values + mask_bytes) / values,
            "server_aggregation_seconds": aggregation,
            "server_mask_bytes_per_client": {"bool_tensor": layout.size, "bit_packed": mask_bytes},
        }


def _bf16_ratios(passes: TimedPasses, seconds: dict[str, float]) -> dict[str, float]:
    """bf16 autocast against fp32 and against plain peft in bf16: tokens/s, and the perplexity after
    the same training."""
    return {
        "perfit_over_peft_tokens_per_s_bf16": seconds["plain_peft_bf16"] / seconds["perfit_bf16"],
        "bf16_over_fp32_tokens_per_s": seconds["perfit_fp32"] / seconds["perfit_bf16"],
        "bf16_ppl_over_fp32_ppl": passes.trained_ppl("bf16") / passes.trained_ppl("fp32"),
    }


def _path_ratios(
    passes: TimedPasses,
    seconds: dict[str, float],
    other: tuple[float, Any] | None,
    blas_bf16: tuple[float, Any] | None,
    fp32_onednn: bool,
) -> dict[str, float]:
    """oneDNN's frozen GEMMs against torch's BLAS: tokens/s and the perplexity after the same training,
    in fp32 (`other`: the FIT pass on whichever path the FIT rows did not take) and in bf16
    (`blas_bf16`: autocast's own matmuls); empty where neither was timed."""
    ratios = {}
    if other is not None:
        default = (seconds["perfit_fp32"], passes.trained_ppl("fp32"))
        other_path = (other[0], passes.held_out_ppl(other[1].flat))
        (onednn_s, onednn_ppl), (blas_s, blas_ppl) = (default, other_path) if fp32_onednn else (other_path, default)
        ratios |= {
            "seconds_onednn_fp32": onednn_s,
            "seconds_blas_fp32": blas_s,
            "onednn_over_blas_tokens_per_s_fp32": blas_s / onednn_s,
            "ppl_onednn_over_blas_fp32": onednn_ppl / blas_ppl,
        }
    if blas_bf16 is not None:
        ratios |= {
            "seconds_blas_bf16": blas_bf16[0],
            "onednn_over_blas_tokens_per_s_bf16": blas_bf16[0] / seconds["perfit_bf16"],
            "ppl_onednn_over_blas_bf16": passes.trained_ppl("bf16") / passes.held_out_ppl(blas_bf16[1].flat),
        }
    return ratios


def _mfu(
    result: dict[str, Any],
    flops: float,
    precisions: tuple[str, ...],
    peak_at_start: dict[str, float],
    peak_at_end: dict[str, float],
) -> dict[str, Any]:
    """MFU of every timed pass (useful FLOPs / seconds / the higher of the two peak readings: these
    machines are shared), the peaks, and the step's useful FLOP rate against what the model's GEMMs
    alone reach at its shapes (`result["gemm_at_model_shapes"]`)."""
    peak = {name: max(peak_at_start[name], peak_at_end[name]) for name in precisions}
    seconds = result["seconds"]
    timings = {**seconds, **{f"{name}_compiled": s for name, s in result["compiled"]["seconds"].items()}}
    mfu = {
        key.removeprefix("perfit_"): flops / timings[key] / (peak[name] * 1e9)
        for name in precisions
        for key in (f"perfit_{name}", f"plain_peft_{name}", f"perfit_{name}_padded", f"{name}_compiled")
        if key in timings
    }
    gemm = result["gemm_at_model_shapes"]["gflops"]
    shapes = result["gemm_at_model_shapes"] | {
        "of_peak": {name: gemm[name] / peak[name] for name in gemm},
        "step_rate_of_gemm_rate": {
            key: mfu[key] * peak[name] / gemm[name]
            for name in precisions
            for key in (name, f"{name}_compiled")
            if key in mfu
        },
    }
    return {
        "mfu": mfu,
        "peak_gflops": peak,
        "peak_gflops_at_start_and_end": {name: [peak_at_start[name], peak_at_end[name]] for name in precisions},
        "gemm_at_model_shapes": shapes,
    }


def with_scale(result: dict[str, Any], scale_json: Path) -> dict[str, Any]:
    """The bench's result plus the whole-federation figures of `perfit bench scale` (docs/scale.json,
    measured by that command in its own run), which this bench does not repeat: round time with
    1,000 vs 100 clients and the peak resident memory of a simulation."""
    if not scale_json.is_file():
        return result
    scale = json.loads(scale_json.read_text())
    keys = ("round_time_1000_over_100", "peak_rss_gib", "server_rss_1000_minus_100_gib")
    return {**result, **{k: scale[k] for k in keys}, "scale_command": scale["command"]}
