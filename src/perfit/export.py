"""Use what a run trained: load a client's personalized model, export its adapter (with a model
card) or the base model with the adapter merged in."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perfit.config import Config, from_toml


class RunError(ValueError):
    """A missing or incomplete run directory, or an unknown client."""


@dataclass(frozen=True)
class Run:
    path: Path
    config: Config
    summary: dict[str, Any]

    def adapter_dir(self, client: int) -> Path:
        directory = self.path / "adapters" / f"client_{client}"
        if not (directory / "adapter_model.safetensors").is_file():
            known = sorted(int(p.name.split("_")[1]) for p in (self.path / "adapters").glob("client_*"))
            raise RunError(f"{self.path}: no client {client}; clients in this run: {known}")
        return directory


def open_run(path: str | Path) -> Run:
    path = Path(path).expanduser().resolve()
    for name in ("config.toml", "summary.json"):
        if not (path / name).is_file():
            raise RunError(f"{path}: not a finished perfit run ({name} missing)")
    return Run(path, from_toml(path / "config.toml"), json.loads((path / "summary.json").read_text()))


def load_client_model(run: str | Path, client: int) -> tuple[Any, Any]:
    """(peft model, tokenizer) of a client's personalized adapter, built the way perfit trains it."""
    from safetensors.torch import load_file

    from perfit.model import attach_lora, load_base, lora_layout, write_flat

    opened = open_run(run)
    tensors = load_file(str(opened.adapter_dir(client) / "adapter_model.safetensors"))
    model, tokenizer = load_base(opened.summary["model"])
    peft_model = attach_lora(model, opened.config.dense_rank, opened.config.alpha_value)
    layout = lora_layout(peft_model)
    write_flat(peft_model, torch.cat([tensors[t.name].flatten() for t in layout.tensors]))
    return peft_model, tokenizer


def model_card(opened: Run, client: int, merged: bool, command: str) -> str:
    config, summary = opened.config, opened.summary
    budget = summary["trainable_params_per_client"][str(client)]
    ppl = summary["per_client_ppl"].get(str(client))
    return "\n".join(
        [
            f"# perfit client {client} ({config.method}){' merged' if merged else ''}",
            "",
            f"- base model: `{summary['model']}`",
            f"- method: {config.method}; split: {config.split}; clients: {config.num_clients}; rounds: {config.rounds}",
            f"- trainable parameters (budget): {budget:,} (rank-{config.client_rank_budget(client)} equivalent)",
            f"- LoRA: q/k/v, dense rank {config.dense_rank}, alpha {config.alpha_value:g}, sparsity {config.sparsity}",
            f"- personalized perplexity on this client's held-out rows: {ppl if ppl is None else f'{ppl:.4f}'}",
            f"- run: `{opened.path}`",
            f"- made by: `{command}`",
            "",
            "Prompt format: Alpaca (`### Instruction:` / `### Input:` / `### Response:`).",
            "",
        ]
    )


def export_client(run: str | Path, client: int, out: str | Path, merge: bool, force: bool, command: str) -> Path:
    """Write the client's adapter (PEFT) or merged model to `out`, with a README model card."""
    opened = open_run(run)
    adapter = opened.adapter_dir(client)
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunError(f"{out} exists and is not empty; pass --force to overwrite")
        shutil.rmtree(out)
    if merge:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(opened.summary["model"], dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(opened.summary["model"]).save_pretrained(out)
    else:
        shutil.copytree(adapter, out, dirs_exist_ok=True)
    (out / "README.md").write_text(model_card(opened, client, merge, command))
    return out
