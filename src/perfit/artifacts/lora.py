"""LoRA through peft: the config perfit attaches (q/k/v, no dropout, no bias), the flat layout of a
model's LoRA tensors (`core.layout.Layout`), read from a peft model or from a model config on the
meta device (no weights), and adapters written in PEFT's format, loadable without perfit."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from perfit.core.layout import Layout, Slot

TARGET_MODULES = ("q_proj", "k_proj", "v_proj")


def lora_config(rank: int, alpha: float, base_path: str | None = None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )


def wrap_lora(model: Any, rank: int, alpha: float) -> Any:
    """`model` wrapped in a new peft LoRA of this rank and alpha."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora_config(rank, alpha))


def lora_layout(peft_model: Any) -> Layout:
    """Where each of the peft model's LoRA tensors lives in the flat adapter (its parameter order)."""
    slots, start = [], 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            slots.append(Slot(name.replace(".default", ""), tuple(param.shape), start))
            start += param.numel()
    for a, b in zip(slots[::2], slots[1::2], strict=True):
        if ".lora_A." not in a.name or ".lora_B." not in b.name:
            raise RuntimeError(f"unexpected LoRA parameter order: {a.name}, {b.name}")
    return Layout(tuple(slots))


def layout_for(model: str | Any, rank: int, alpha: float) -> Layout:
    """The layout of a model given by its path or its transformers config, without loading weights
    (the model on the meta device): what the server needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model) if isinstance(model, str | Path) else model
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return lora_layout(wrap_lora(skeleton, rank, alpha))


def save_adapter(directory: Path, layout: Layout, flat: torch.Tensor, rank: int, alpha: float, base_path: str) -> None:
    """Write a PEFT adapter (adapter_config.json + adapter_model.safetensors) loadable without perfit."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    lora_config(rank, alpha, base_path).save_pretrained(str(directory))
    tensors = {name: value.contiguous().clone() for name, value in layout.unflatten(flat.float()).items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter_flat(path: Path, layout: Layout) -> torch.Tensor:
    """A PEFT adapter file (`adapter_model.safetensors`, as `save_adapter` writes it) read back as one
    flat fp32 vector in `layout`'s order. A tensor the layout needs that is missing, or has another
    shape, is a ValueError naming it: the adapter was made for another model or rank."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for slot in layout.slots:
        if slot.name not in tensors or tuple(tensors[slot.name].shape) != slot.shape:
            found = tuple(tensors[slot.name].shape) if slot.name in tensors else "missing"
            raise ValueError(f"{path}: tensor {slot.name} is {found}, expected shape {slot.shape}")
    return torch.cat([tensors[slot.name].flatten().float() for slot in layout.slots])
