"""Personalize for a data owner who joins after training: validate their data, split 80/20, search
their own mask (Alg. 1) scored at the run's global adapter, start from the global values at that
mask, fine-tune locally, and compare personalized perplexity with the base model and the global
adapter. Writes a PEFT adapter the owner can use like any exported one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from perfit.artifacts.lora import save_adapter
from perfit.client.data import ClientSplit, DataError, load_rows, split_train_eval, tokenize
from perfit.client.hardware import training_autocast
from perfit.client.task import search_adapter_mask
from perfit.client.train import Schedule, evaluate_nll, train_masked
from perfit.core.aggregate import personalize
from perfit.core.layout import budget_groups
from perfit.core.metrics import perplexity
from perfit.use.export import Run, RunError, RunModel, open_run, prepare_out


def owner_rows(run: Run, data: str | Path | None, holdout_client: int | None) -> tuple[list[dict], ClientSplit]:
    """The joining owner's rows and their 80/20 split: a .jsonl of their own, or (to measure join on
    a run) the rows of a client the run held out of training."""
    config = run.config
    if (data is None) == (holdout_client is None):
        raise RunError("give exactly one of --data FILE or --holdout-client ID")
    if data is not None:
        rows = load_rows(str(data))
        return rows, split_train_eval(list(range(len(rows))), config.max_samples_per_client, seed=config.seed)
    partition = run.partitions.get(holdout_client)
    if partition is None:
        raise RunError(f"{run.path}: no client {holdout_client} in partitions.json")
    if not partition.get("held_out"):
        raise RunError(f"{run.path}: client {holdout_client} took part in training; held out: {run.config.held_out}")
    rows = load_rows(config.data)
    return rows, ClientSplit(train=partition["train"], eval=partition["eval"])


def join(
    run: str | Path,
    out: str | Path,
    data: str | Path | None = None,
    holdout_client: int | None = None,
    model: str | None = None,
    force: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Personalize the run for a new owner; returns (and writes to `out/join.json`) the three
    personalized perplexities: base model, the run's global adapter as is, and the owner's adapter."""
    started = time.perf_counter()
    opened = open_run(run)
    rows, split = owner_rows(opened, data, holdout_client)
    if not split.train or not split.eval:
        rows_given = len(split.train) + len(split.eval)
        raise DataError(f"{data or opened.config.data}: need at least 2 rows (train and held-out), got {rows_given}")
    out = prepare_out(out, force)
    config = opened.config
    loaded = RunModel(opened, model)
    layout, tokenizer, pad_id = loaded.layout, loaded.tokenizer, loaded.tokenizer.pad_token_id
    train = [tokenize(rows[i], tokenizer, config.cutoff_len) for i in split.train]
    held_out = [tokenize(rows[i], tokenizer, config.cutoff_len) for i in split.eval]
    global_flat = loaded.flat(None)

    def ppl(flat: torch.Tensor) -> float:
        return perplexity(*evaluate_nll(loaded.peft_model, flat, held_out, pad_id, config.micro_batch_size))

    search_started = time.perf_counter()  # FIT: the budget is the whole adapter, so the mask is all ones
    groups = budget_groups(layout, config.scope, config.rank)
    mask = search_adapter_mask(loaded.peft_model, global_flat, train, pad_id, config, groups, config.seed)
    search_seconds = time.perf_counter() - search_started
    result = train_masked(
        loaded.peft_model,
        personalize(global_flat, mask),
        mask,
        train,
        pad_id,
        Schedule.of(config, seed=config.seed),
        autocast_dtype=training_autocast(config.dtype),
    )
    report = {
        "run": str(opened.path),
        "method": config.method,
        "data": str(data) if data is not None else f"held-out client {holdout_client} of {config.data}",
        "train_rows": len(split.train),
        "eval_rows": len(split.eval),
        "trainable_params": int(mask.sum()),
        "ppl_base": ppl(torch.zeros(layout.size)),
        "ppl_global": ppl(global_flat),
        "ppl_own": ppl(result.flat),
        "train_loss": result.loss,
        "steps": result.steps,
        "search_seconds": search_seconds,
        "seconds": time.perf_counter() - started,
        "command": command,
    }
    save_adapter(out, layout, result.flat, config.dense_rank, config.alpha_value, loaded.base_path)
    (out / "join.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
