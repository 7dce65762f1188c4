"""`perfit bench speed`: what local training costs on this machine, measured side by side in one
run and reported as ratios. Every figure is timed here; nothing is taken from elsewhere.
Peaks, GEMM rates and the useful FLOPs MFU counts: `perfit.bench.flops`.
"""

from __future__ import annotations

import functools
import json
import random
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
from perfit.client import onednn
from perfit.client.data import Example, load_rows, partition, tokenize
from perfit.client.hardware import cpu_description, cpu_has_bf16, training_autocast
from perfit.client.model import attach_lora, compile_decoder, device_of, load_base, lora_parameters
from perfit.client.train import Schedule, autocast, evaluate_nll, train_masked
from perfit.config import Config
from perfit.core.aggregate import Accumulator
from perfit.core.layout import initial_adapter
from perfit.core.metrics import perplexity


def sample_examples(
    all_rows: list[dict[str, str]], tokenizer: Any, rows: int, cutoff_len: int, held_out: int | None = None
) -> tuple[list[Example], list[Example]]:
    """The bench's seeded (train, held-out) rows of the data file, tokenised: `rows` to train on and
    `held_out` (default as many) after them in the same seeded draw, so a smaller held-out set is a
    prefix of the default one and the train rows never change with it."""
    held_out = rows if held_out is None else held_out
    picked = random.Random(0).sample(range(len(all_rows)), rows + held_out)
    examples = [tokenize(all_rows[i], tokenizer, cutoff_len) for i in picked]
    return examples[:rows], examples[rows:]


def random_mask(size: int, budget: int, seed: int) -> torch.Tensor:
    """A seeded mask holding exactly `budget` of `size` positions (timing only; not a searched mask)."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:budget]] = True
    return mask


def rotated(base: torch.Tensor, client: int) -> torch.Tensor:
    """Client `client`'s copy of a random mask or update for timing Eq. 6 on the server: `base` rotated
    by client x 7,919 positions (a prime: the shifts differ for every client below the size unless
    7,919 divides it), so each client's mask has the same budget and its own pattern, far faster
    than a randperm per client."""
    return torch.roll(base, shifts=client * 7919 % base.numel())


def plain_peft_pass(
    peft_model: Any,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    micro: int,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """The loop a user writes with peft + torch: padded micro-batches in data order, the full head
    and HF's loss on every position, AdamW on all LoRA parameters; the forward/backward under
    autocast when `autocast_dtype` is given."""
    params = lora_parameters(peft_model)
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    device = device_of(peft_model)
    peft_model.train()
    for start in range(0, len(examples), batch_size):
        optimizer.zero_grad(set_to_none=True)
        batch = examples[start : start + batch_size]
        for offset in range(0, len(batch), micro):
            chunk = batch[offset : offset + micro]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in chunk])
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk])
            attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
            with autocast(peft_model, autocast_dtype):
                loss = peft_model(
                    input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)
                ).loss
            loss.backward()
        optimizer.step()
    peft_model.eval()


def local_pass(
    base: Any,
    config: Config,
    pad_id: int,
    rank: int,
    budget_rank: int,
    autocast: torch.dtype | None = None,
    packed: bool | None = None,
    micro_batch_size: int | None = None,
) -> tuple[Any, Any, Any]:
    """(peft model, layout, run) for timing one client's local training: a fresh rank-`rank` adapter
    on `base` with a seeded random mask of the rank-`budget_rank` budget (FIT: both r; PerFIT: the
    dense rank r/(1-s) masked to r's budget), and `run(rows)`, one epoch of `train_masked` over the
    rows from the same start and seed, at the config's batch and `micro_batch_size` (default the
    config's)."""
    peft_model = attach_lora(base, rank, 2.0 * rank)
    layout = lora_layout(peft_model)
    mask = random_mask(layout.size, layout.budget(budget_rank), seed=0)
    start = initial_adapter(layout, "peft", 0) * mask
    schedule = Schedule(1, config.batch_size, micro_batch_size or config.micro_batch_size, config.lr, seed=0)

    def run(subset: list[Example]) -> Any:
        return train_masked(peft_model, start, mask, subset, pad_id, schedule, autocast_dtype=autocast, packed=packed)

    return peft_model, layout, run


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
        with_onednn, fp32_onednn = routing.enabled, routing.fp32  # where this torch build has the ops
        # half as many held-out rows: they only compare two adapters trained alike (ratios near 1.0000),
        # and the bench evaluates four adapters
        train, held_out = sample_examples(all_rows, tokenizer, self.rows, config.cutoff_len, max(self.rows // 2, 1))
        pad = tokenizer.pad_token_id
        tokens = sum(len(e.input_ids) for e in train)
        ceiling = gemm_ceiling(base, train, config, precisions=precisions)
        gemm = ceiling["gflops"]

        longest = sorted(train, key=lambda e: len(e.input_ids))[-config.micro_batch_size :]

        def timed(fn: Any, warm: bool = True) -> tuple[float, Any]:
            """(seconds, result) of `fn(train)` after a warm-up on the longest micro-batch: kernel choice,
            and the heap grown to its high-water mark (`allocator.keep_freed_memory` keeps it), as it
            is after a run's first steps; otherwise whichever pass comes first pays the page faults.
            `warm=False` where the pass just before trained the same rows in the same layout (it has
            run the longest micro-batch already)."""
            if warm:
                fn(longest)
            begin = time.perf_counter()
            result = fn(train)
            return time.perf_counter() - begin, result

        def masked_pass(
            rank: int, budget_rank: int, autocast: torch.dtype | None = None, packed: bool | None = None
        ) -> Any:
            return local_pass(base, config, pad, rank, budget_rank, autocast, packed)

        n_linear, n_lora = linear_params(base), lora_layout(attach_lora(base, config.rank, 2.0 * config.rank)).size
        flops = useful_flops(base.config, n_linear, n_lora, train)

        evaluator = attach_lora(load_base(resolve_model(config))[0], config.rank, 2.0 * config.rank)  # never compiled

        def held_out_ppl(flat: torch.Tensor) -> float:
            """Personalized perplexity of a rank-r adapter on the held-out rows, fp32 and eager."""
            return perplexity(*evaluate_nll(evaluator, flat, held_out, pad, config.micro_batch_size))

        @functools.cache
        def trained_ppl(name: str) -> float:
            """`held_out_ppl` of precision `name`'s perfit pass (`trained[name]`), evaluated once: up to
            three ratios share it (packed / padded, oneDNN / BLAS, compiled / eager, bf16 / fp32)."""
            return held_out_ppl(trained[name].flat)

        dense = round(config.rank / (1 - config.sparsity))
        seconds: dict[str, float] = {}
        trained: dict[str, Any] = {}  # each precision's perfit pass: the same start, rows and seed
        # a PerFIT client (dense rank, masked to the budget) against FIT, and FIT on the other path for the
        # frozen GEMMs (torch's BLAS where they go through oneDNN, else oneDNN), timed FIT, PerFIT,
        # other, PerFIT, FIT so that a drift of this shared machine's speed over the five passes cancels
        fit_first, trained["fp32"] = timed(masked_pass(config.rank, config.rank)[2])
        round_passes = {"perfit": [timed(masked_pass(dense, config.rank)[2], warm=False)[0]]}
        other = self._other_path_pass(base, masked_pass(config.rank, config.rank)[2], timed, "fp32", with_onednn)
        dense_again = masked_pass(dense, config.rank)[2]  # anew: the other pass's wrap replaced the first
        round_passes["perfit"].append(timed(dense_again, warm=False)[0])
        round_passes["fit"] = [fit_first, timed(masked_pass(config.rank, config.rank)[2], warm=False)[0]]
        seconds["perfit_fp32"] = statistics.fmean(round_passes["fit"])
        seconds["perfit_round_dense_rank"] = statistics.fmean(round_passes["perfit"])
        blas_bf16 = None
        for name in precisions:
            dtype = autocast_for(name)
            if name != "fp32":
                first, trained[name] = timed(masked_pass(config.rank, config.rank, dtype)[2])
                passes = [first]
                if name == "bf16" and with_onednn and onednn.bf16_supported():  # oneDNN, autocast's, oneDNN
                    blas_bf16 = self._other_path_pass(base, masked_pass(config.rank, config.rank, dtype)[2], timed,
                                                      name, True)  # fmt: skip
                    passes.append(timed(masked_pass(config.rank, config.rank, dtype)[2], warm=False)[0])
                    round_passes["bf16_onednn"] = passes
                seconds[f"perfit_{name}"] = statistics.fmean(passes)
            plain_model = masked_pass(config.rank, config.rank)[0]
            seconds[f"plain_peft_{name}"], _ = timed(
                lambda subset, model=plain_model, dtype=dtype: plain_peft_pass(
                    model, subset, pad, config.batch_size, config.micro_batch_size, dtype
                )
            )
        seconds[f"perfit_{used}_padded"], padded = timed(masked_pass(config.rank, config.rank, autocast_for(used),
                                                                     packed=False)[2])  # fmt: skip
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
            "packed_ppl_over_padded_ppl": trained_ppl(used) / held_out_ppl(padded.flat),
            "perfit_over_peft_tokens_per_s": seconds["plain_peft_fp32"] / seconds["perfit_fp32"],
            "perfit_round_over_fit_round": seconds["perfit_round_dense_rank"] / seconds["perfit_fp32"],
            "round_passes_seconds": round_passes,
            "onednn": {"used": with_onednn, "fp32_default": "onednn" if fp32_onednn else "blas"},
            **self._bytes_and_server(dense),
            **self._search_share(masked_pass, dense, train, held_out, pad, all_rows, precisions, dense_seconds),
        }
        if other is not None:  # oneDNN's pass and BLAS's, whichever of them the FIT rows are
            default, other_path = (seconds["perfit_fp32"], trained_ppl("fp32")), (other[0], held_out_ppl(other[1].flat))
            (onednn_s, onednn_ppl), (blas_s, blas_ppl) = (default, other_path) if fp32_onednn else (other_path, default)
            result["onednn"] |= {
                "seconds_onednn_fp32": onednn_s,
                "seconds_blas_fp32": blas_s,
                "onednn_over_blas_tokens_per_s_fp32": blas_s / onednn_s,
                "ppl_onednn_over_blas_fp32": onednn_ppl / blas_ppl,
            }
        if blas_bf16 is not None:
            result["onednn"] |= {
                "seconds_blas_bf16": blas_bf16[0],
                "onednn_over_blas_tokens_per_s_bf16": blas_bf16[0] / seconds["perfit_bf16"],
                "ppl_onednn_over_blas_bf16": trained_ppl("bf16") / held_out_ppl(blas_bf16[1].flat),
            }
        if with_bf16:
            result["perfit_over_peft_tokens_per_s_bf16"] = seconds["plain_peft_bf16"] / seconds["perfit_bf16"]
            result["bf16_over_fp32_tokens_per_s"] = seconds["perfit_fp32"] / seconds["perfit_bf16"]
            result["bf16_ppl_over_fp32_ppl"] = trained_ppl("bf16") / trained_ppl("fp32")
        else:
            result["bf16_not_timed"] = emulated_bf16_probe()
        # last: compiling the decoder is process-wide, so everything above ran eager. Only at the training
        # precision (`torch_compile=auto` compiles that path alone): an fp32 compile on a bf16 CPU would
        # time a path `dtype=auto` does not take there
        eager = {used: seconds[f"perfit_{used}"]}
        result["compiled"] = self._compiled(base, masked_pass, train, eager, trained_ppl(used), held_out_ppl)
        # the peak again: these machines are shared, and MFU is taken against the higher reading
        peak_at_end = {name: matmul_peak_gflops(DTYPES[name]) for name in precisions}
        peak = {name: max(peak_at_start[name], peak_at_end[name]) for name in precisions}
        timings = {**seconds, **{f"{name}_compiled": s for name, s in result["compiled"]["seconds"].items()}}
        result["mfu"] = {
            key.removeprefix("perfit_"): flops / timings[key] / (peak[name] * 1e9)
            for name in precisions
            for key in (f"perfit_{name}", f"plain_peft_{name}", f"perfit_{name}_padded", f"{name}_compiled")
            if key in timings
        }
        result["peak_gflops"] = peak
        result["peak_gflops_at_start_and_end"] = {name: [peak_at_start[name], peak_at_end[name]] for name in precisions}
        # the step's useful FLOP rate against what the model's GEMMs alone reach at its shapes
        result["gemm_at_model_shapes"] |= {
            "of_peak": {name: gemm[name] / peak[name] for name in gemm},
            "step_rate_of_gemm_rate": {
                key: result["mfu"][key] * peak[name] / gemm[name]
                for name in precisions
                for key in (name, f"{name}_compiled")
                if key in result["mfu"]
            },
        }
        # the bench process (model copies and timing loops), not a simulation run (see `perfit bench scale`)
        result["bench_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["bench_seconds"] = time.perf_counter() - started
        return result

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

    def _compiled(
        self,
        base: Any,
        masked_pass: Any,
        train: list[Example],
        eager_seconds: dict[str, float],
        eager_ppl: float,
        held_out_ppl: Any,
    ) -> dict[str, Any]:
        """The same perfit pass with the decoder compiled (`torch_compile=1`), in the precision of
        `eager_seconds` (the training precision): first-call cost (compile + one micro-batch), pass
        seconds, and personalized perplexity after the compiled pass against the eager one
        (`eager_ppl`, of the eager pass: same start, rows, seed and precision). Both adapters are
        evaluated the same way, on the eager copy of the model (`held_out_ppl`): compiling the no-grad graph as well
        would cost the bench minutes and measure nothing about training."""
        compile_decoder(base)
        first_call, seconds, flats = {}, {}, {}
        for name in eager_seconds:
            _, _, run_pass = masked_pass(self.config.rank, self.config.rank, autocast_for(name))
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
            **{f"ppl_compiled_over_eager_{name}": held_out_ppl(flats[name]) / eager_ppl for name in flats},
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

    def _search_share(
        self,
        masked_pass: Any,
        dense: int,
        train: list[Example],
        held_out: list[Example],
        pad: int,
        all_rows: list[dict[str, str]],
        precisions: tuple[str, ...],
        dense_pass_seconds: float | None,
    ) -> dict[str, Any]:
        """The one-time search's share of a client's compute over a run at the config's proportions,
        both at the precision local training uses: the search timed here, training from the PerFIT
        client's (dense rank, masked) fp32 passes (`dense_pass_seconds`, the same rows; None: timed
        here, at the training precision); and, where bf16 is timed, the search in bf16 against fp32:
        mask agreement and personalized perplexity after the same masked training from each mask,
        beside the same two figures for a second fp32 search that takes the rows in another seeded
        order (how far two equally valid masks differ, against which the bf16 one is read)."""
        from perfit.client.task import search_adapter_mask
        from perfit.core.layout import budget_groups

        config = self.config
        autocast = training_autocast(config.dtype)
        peft_model, layout, run_pass = masked_pass(dense, config.rank, autocast)
        theta = initial_adapter(layout, "symmetric", 0)
        groups = budget_groups(layout, config.scope, config.rank)
        batches = -(-len(train) // config.micro_batch_size)
        passes = config.pruning_steps * min(config.search_batches, batches)
        masks, per_scoring_batch = {}, {}
        for name in precisions:
            warm = config.replace(dtype=name, prune_iterations=1)  # one untimed pass, as timed() does for training
            search_adapter_mask(peft_model, theta, train[: config.micro_batch_size], pad, warm, groups, 0)
            begin = time.perf_counter()
            masks[name] = search_adapter_mask(peft_model, theta, train, pad, config.replace(dtype=name), groups, 0)
            per_scoring_batch[name] = (time.perf_counter() - begin) / passes
        if dense_pass_seconds is None:
            begin = time.perf_counter()
            run_pass(train)
            dense_pass_seconds = time.perf_counter() - begin
        per_training_batch = dense_pass_seconds / batches
        if len(masks) > 1:  # the control: fp32, the steps taking the micro-batches in another order
            masks["fp32_seed1"] = search_adapter_mask(
                peft_model, theta, train, pad, config.replace(dtype="fp32"), groups, 1
            )
        ppl = {}
        for name, mask in masks.items() if len(masks) > 1 else ():  # only bf16 against fp32 reads them
            flat = train_masked(peft_model, theta * mask, mask, train, pad, Schedule.of(config, epochs=1),
                                autocast_dtype=autocast).flat  # fmt: skip
            ppl[name] = perplexity(*evaluate_nll(peft_model, flat, held_out, pad, config.micro_batch_size))
        used = "bf16" if autocast is not None else "fp32"
        per_round = config.clients_per_round / config.num_clients * config.local_epochs  # epochs a client trains
        splits = partition(all_rows, config)  # the config's clients over the bench's data file
        inputs = {
            "dtype": used,
            "pruning_steps": config.pruning_steps,
            "search_batches": config.search_batches,
            "seconds_per_scoring_micro_batch": per_scoring_batch[used],
            "seconds_per_training_micro_batch": per_training_batch,
            "participations_per_client": config.rounds * per_round,
            "participations_per_client_at_50_rounds": 50 * per_round,  # Table 2's rounds
            "train_rows_per_client": statistics.fmean(len(split.train) for split in splits.values()),
            "micro_batch_size": config.micro_batch_size,
        }
        result: dict[str, Any] = {"search_share": search_share(inputs), "search_share_inputs": inputs}
        if "bf16" in masks:
            result["search_bf16"] = {
                "scoring_seconds_fp32_over_bf16": per_scoring_batch["fp32"] / per_scoring_batch["bf16"],
                "mask_agreement": float((masks["fp32"] & masks["bf16"]).sum() / masks["fp32"].sum()),
                "ppl_bf16_mask_over_fp32_mask": ppl["bf16"] / ppl["fp32"],
                "mask_agreement_fp32_other_order": float(
                    (masks["fp32"] & masks["fp32_seed1"]).sum() / masks["fp32"].sum()
                ),
                "ppl_fp32_other_order_mask_over_fp32_mask": ppl["fp32_seed1"] / ppl["fp32"],
            }
        return result


def search_share(inputs: dict[str, Any], participations: float | None = None, passes: float | None = None) -> float:
    """The search's share of a client's compute, search / (search + training): `passes` scoring
    micro-batches (default T_p x search_batches) against `participations` local epochs over the
    client's train rows (default the config's), each side at its measured seconds per micro-batch."""
    passes = inputs["pruning_steps"] * inputs["search_batches"] if passes is None else passes
    participations = inputs["participations_per_client"] if participations is None else participations
    search = passes * inputs["seconds_per_scoring_micro_batch"]
    training_batches = participations * inputs["train_rows_per_client"] / inputs["micro_batch_size"]
    training = training_batches * inputs["seconds_per_training_micro_batch"]
    return search / (search + training)


def passes_within(inputs: dict[str, Any], share: float, participations: float | None = None) -> int:
    """The most scoring micro-batches a search may take and stay within `share` of a client's compute."""
    passes = 0
    while search_share(inputs, participations, passes + 1) <= share:
        passes += 1
    return passes


def with_scale(result: dict[str, Any], scale_json: Path) -> dict[str, Any]:
    """The bench's result plus the whole-federation figures of `perfit bench scale` (docs/scale.json,
    measured by that command in its own run), which this bench does not repeat: round time with
    1,000 vs 100 clients and the peak resident memory of a simulation."""
    if not scale_json.is_file():
        return result
    scale = json.loads(scale_json.read_text())
    keys = ("round_time_1000_over_100", "peak_rss_gib", "server_rss_1000_minus_100_gib")
    return {**result, **{k: scale[k] for k in keys}, "scale_command": scale["command"]}
