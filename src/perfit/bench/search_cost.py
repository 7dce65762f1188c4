"""The one-time mask search's share of a client's compute (`perfit bench speed`): the search and the
training it precedes, timed at the precision local training uses, and where bf16 is timed, the bf16
search read against fp32 by the masks it finds and the models trained from them (paper Sec. 4.2)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from perfit.bench.passes import TimedPasses
from perfit.client.hardware import training_autocast
from perfit.client.train import Schedule, evaluate_nll, train_masked
from perfit.config import Config
from perfit.core.layout import initial_adapter
from perfit.core.metrics import perplexity


def search_cost(
    config: Config,
    passes: TimedPasses,
    dense: int,
    splits: dict[Any, Any],
    precisions: tuple[str, ...],
    dense_pass_seconds: float | None,
) -> dict[str, Any]:
    """The search's share of a client's compute over a run at the config's proportions (`splits`: the
    config's clients over the bench's data), both at the precision local training uses: the search
    timed here, training from the PerFIT client's (dense rank, masked) fp32 passes
    (`dense_pass_seconds`, the same rows; None: timed here, at the training precision). Where bf16
    is timed, `search_bf16` reads the bf16 search against fp32 (`_bf16_against_fp32`)."""
    from perfit.client.task import search_adapter_mask
    from perfit.core.layout import budget_groups

    train, pad = passes.train, passes.pad
    autocast = training_autocast(config.dtype)
    peft_model, layout, run_pass = passes.masked(dense, config.rank, autocast)
    theta = initial_adapter(layout, "symmetric", 0)
    groups = budget_groups(layout, config.scope, config.rank)
    batches = -(-len(train) // config.micro_batch_size)
    scoring_passes = config.pruning_steps * min(config.search_batches, batches)
    masks, per_scoring_batch = {}, {}
    for name in precisions:
        warm = config.replace(dtype=name, prune_iterations=1)  # one untimed pass, as timed() does for training
        search_adapter_mask(peft_model, theta, train[: config.micro_batch_size], pad, warm, groups, 0)
        begin = time.perf_counter()
        masks[name] = search_adapter_mask(peft_model, theta, train, pad, config.replace(dtype=name), groups, 0)
        per_scoring_batch[name] = (time.perf_counter() - begin) / scoring_passes
    if dense_pass_seconds is None:
        begin = time.perf_counter()
        run_pass(train)
        dense_pass_seconds = time.perf_counter() - begin
    if len(masks) > 1:  # the control: fp32, the steps taking the micro-batches in another order
        masks["fp32_seed1"] = search_adapter_mask(
            peft_model, theta, train, pad, config.replace(dtype="fp32"), groups, 1
        )
    used = "bf16" if autocast is not None else "fp32"
    per_round = config.clients_per_round / config.num_clients * config.local_epochs  # epochs a client trains
    inputs = {
        "dtype": used,
        "pruning_steps": config.pruning_steps,
        "search_batches": config.search_batches,
        "seconds_per_scoring_micro_batch": per_scoring_batch[used],
        "seconds_per_training_micro_batch": dense_pass_seconds / batches,
        "participations_per_client": config.rounds * per_round,
        "participations_per_client_at_50_rounds": 50 * per_round,  # Table 2's rounds
        "train_rows_per_client": statistics.fmean(len(split.train) for split in splits.values()),
        "micro_batch_size": config.micro_batch_size,
    }
    result: dict[str, Any] = {"search_share": search_share(inputs), "search_share_inputs": inputs}
    if "bf16" in masks:
        ppl = {
            name: trained_from_mask(config, peft_model, theta, mask, passes, autocast) for name, mask in masks.items()
        }
        result["search_bf16"] = _bf16_against_fp32(masks, ppl, per_scoring_batch)
    return result


def _bf16_against_fp32(
    masks: dict[str, torch.Tensor], ppl: dict[str, float], per_scoring_batch: dict[str, float]
) -> dict[str, float]:
    """The bf16 search against fp32: its speed, the masks' agreement (share of fp32's kept positions
    bf16 keeps too) and the perplexity after the same training from each mask, beside the same two
    figures for a second fp32 search that takes the rows in another seeded order (how far two
    equally valid masks differ, against which the bf16 one is read)."""

    def agreement(other: str) -> float:
        return float((masks["fp32"] & masks[other]).sum() / masks["fp32"].sum())

    return {
        "scoring_seconds_fp32_over_bf16": per_scoring_batch["fp32"] / per_scoring_batch["bf16"],
        "mask_agreement": agreement("bf16"),
        "ppl_bf16_mask_over_fp32_mask": ppl["bf16"] / ppl["fp32"],
        "mask_agreement_fp32_other_order": agreement("fp32_seed1"),
        "ppl_fp32_other_order_mask_over_fp32_mask": ppl["fp32_seed1"] / ppl["fp32"],
    }


def trained_from_mask(
    config: Config, peft_model: Any, theta: torch.Tensor, mask: torch.Tensor, passes: TimedPasses, autocast: Any
) -> float:
    """Personalized perplexity on the held-out rows after one epoch of masked training from
    `theta` at `mask`'s positions: how good a searched mask is, read the same way for each."""
    flat = train_masked(peft_model, theta * mask, mask, passes.train, passes.pad, Schedule.of(config, epochs=1),
                        autocast_dtype=autocast).flat  # fmt: skip
    return perplexity(*evaluate_nll(peft_model, flat, passes.held_out, passes.pad, config.micro_batch_size))


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
