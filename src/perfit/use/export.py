"""Use what a run trained: open a run directory, load a client's personalized model onto the run's
base model, export its adapter (with a model card) or the base model with the adapter merged in."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from perfit.config import Config, from_toml
from perfit.federation.run_directory import read_summary


class RunError(ValueError):
    """A missing or incomplete run directory, an unknown client, or a different base model."""


@dataclass(frozen=True)
class Run:
    path: Path
    config: Config
    summary: dict[str, Any]

    @property
    def clients(self) -> list[int]:
        return sorted(int(p.name.split("_")[1]) for p in (self.path / "adapters").glob("client_*"))

    def client_id(self, client: int | str) -> int:
        """A client by its id, or by its owner's name (`split=owner`: summary.json's `client_names`)."""
        text = str(client).strip()
        if text.isdigit():
            return int(text)
        names = {name: int(key) for key, name in self.summary.get("client_names", {}).items()}
        if text not in names:
            known = f"names {sorted(names)}" if names else f"ids {self.clients} (this run's clients have no names)"
            raise RunError(f"{self.path}: no client named {text!r}; clients: {known}")
        return names[text]

    def adapter_dir(self, client: int | str | None) -> Path:
        """`adapters/client_<id>/`, or `adapters/global/` for client None (the server's adapter)."""
        client = None if client is None else self.client_id(client)
        directory = self.path / "adapters" / ("global" if client is None else f"client_{client}")
        if not (directory / "adapter_model.safetensors").is_file():
            if client is None:
                raise RunError(f"{self.path}: no global adapter (adapters/global/); made by an older perfit?")
            if self.summary.get("client_adapters") == "clients":
                raise RunError(
                    f"{self.path}: {self.config.method} keeps each client's final adapter on the client "
                    "(kept or fine-tuned there), so the server has no client adapters; only the global one"
                )
            held_out = self.summary.get("held_out_clients", [])
            hint = f"; clients {held_out} were held out, see `perfit join`" if held_out else ""
            raise RunError(f"{self.path}: no client {client}; clients in this run: {self.clients}{hint}")
        return directory

    @cached_property
    def partitions(self) -> dict[int, dict[str, Any]]:
        return {int(c): p for c, p in json.loads((self.path / "partitions.json").read_text()).items()}


def open_run(path: str | Path) -> Run:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    for name in ("config.toml", "summary.json"):
        if not (path / name).is_file():
            raise RunError(f"{path}: not a finished perfit run ({name} missing)")
    return Run(path, from_toml(path / "config.toml"), read_summary(path / "summary.json"))


def base_model_path(run: Run, model: str | None = None) -> str:
    """The base model to load for `run`: the one it recorded, or `model` (e.g. a copy on another
    machine) after checking that it is the same model."""
    from perfit.artifacts.base_model import model_fingerprint, resolve_model

    recorded = run.summary["model"]
    if model is None:
        if Path(recorded).is_absolute() and not Path(recorded).exists():
            raise RunError(f"{run.path}: its base model {recorded} is missing; pass --model with a copy of it")
        return recorded
    candidate = resolve_model(run.config.replace(model=model))
    expected = run.summary.get("model_fingerprint")
    if expected is not None and model_fingerprint(candidate) != expected:
        raise RunError(
            f"{model} is a different base model from the one run {run.path} was trained on "
            f"({run.config.model} at {recorded}); its adapters only fit that model"
        )
    return candidate


def prepare_out(out: str | Path, force: bool) -> Path:
    """An output directory that is new or empty; an existing one is replaced only with `force`."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise RunError(f"{out} exists and is not empty; pass --force to overwrite")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return out


class RunModel:
    """A run's base model with its dense LoRA attached; any of the run's adapters can be put in."""

    def __init__(self, run: str | Path | Run, model: str | None = None) -> None:
        from perfit.artifacts.lora import lora_layout
        from perfit.client.model import attach_lora, load_base

        self.run = run if isinstance(run, Run) else open_run(run)
        self.base_path = base_model_path(self.run, model)
        base, self.tokenizer = load_base(self.base_path)
        self.peft_model = attach_lora(base, self.run.config.dense_rank, self.run.config.alpha_value)
        self.layout = lora_layout(self.peft_model)

    def flat(self, client: int | str | None) -> torch.Tensor:
        """A client's personalized adapter (None: the global one) as one flat vector."""
        from perfit.artifacts.lora import load_adapter_flat

        path = self.run.adapter_dir(client) / "adapter_model.safetensors"
        try:
            return load_adapter_flat(path, self.layout)
        except ValueError as err:
            raise RunError(f"{err}; the run was made with a different base model than {self.base_path}") from err

    def use(self, flat: torch.Tensor) -> Any:
        """The peft model with this flat adapter written in."""
        from perfit.client.model import write_flat

        write_flat(self.peft_model, flat)
        return self.peft_model


def load_client_model(run: str | Path, client: int | str, model: str | None = None) -> tuple[Any, Any]:
    """(peft model, tokenizer) of a client's personalized adapter, built the way perfit trains it."""
    loaded = RunModel(run, model)
    return loaded.use(loaded.flat(client)), loaded.tokenizer


def model_card(opened: Run, client: int, merged: bool, command: str) -> str:
    config, summary = opened.config, opened.summary
    budget = summary["trainable_params_per_client"][str(client)]
    ppl = summary["per_client_ppl"].get(str(client))
    name = summary.get("client_names", {}).get(str(client))
    who = f"client {client}" + (f", {name}" if name else "")
    return "\n".join(
        [
            f"# perfit {who} ({config.method}){' merged' if merged else ''}",
            "",
            f"- base model: `{config.model}` (`{summary['model']}`)",
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


def export_client(
    run: str | Path,
    client: int | str,
    out: str | Path,
    merge: bool = False,
    force: bool = False,
    command: str = "",
    model: str | None = None,
) -> Path:
    """Write the client's adapter (PEFT) or merged model to `out`, with a README model card; the
    client by id or by its owner's name."""
    opened = open_run(run)
    client = opened.client_id(client)
    adapter = opened.adapter_dir(client)
    base_path = base_model_path(opened, model)
    out = prepare_out(out, force)
    if merge:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    else:
        shutil.copytree(adapter, out, dirs_exist_ok=True)
    (out / "README.md").write_text(model_card(opened, client, merge, command or f"perfit export {run}"))
    return out
