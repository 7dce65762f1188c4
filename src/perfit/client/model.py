"""The base model in this process (loaded once, shared by every client it serves) and its peft LoRA:
attach a LoRA of a given rank, read and write the flat adapter (`core.layout`), compile the decoder."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from perfit.artifacts.lora import wrap_lora
from perfit.client.allocator import keep_freed_memory

_PROCESS_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
# What this process did to a model, held beside it rather than as attributes on it: the decoders
# `compile_decoder` compiled, and each base model's current peft wrap (`attach_lora`).
_COMPILED: weakref.WeakSet[Any] = weakref.WeakSet()
_LORA: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def resolve_device(name: str) -> torch.device:
    """The torch device of the config field `device`: `auto` is cuda where torch sees a GPU, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"config field 'device': {name!r} asked for, but torch {torch.__version__} sees no GPU "
            "(a CPU build, or no driver); use device=cpu or auto"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"config field 'device': {name!r}, but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def device_of(model: Any) -> torch.device:
    """Where a model's parameters are."""
    return next(model.parameters()).device


def load_base(path: str, shared: bool = True, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) on `device`, loaded once per process and device and reused by every
    client and round; `shared=False` loads a private copy (the speed bench compiles its own). A
    process that loads the model trains with it, so it keeps freed memory for reuse
    (`allocator.keep_freed_memory`)."""
    keep_freed_memory()
    key = (path, str(torch.device(device)))
    if not shared or key not in _PROCESS_MODELS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.requires_grad_(False)
        model.to(device)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: tokenizer has no EOS token")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not shared:
            return model, tokenizer
        _PROCESS_MODELS[key] = (model, tokenizer)
    return _PROCESS_MODELS[key]


def compile_decoder(model: Any) -> None:
    """`torch.compile` the decoder in place (inductor, dynamic sequence lengths), once: each decoder
    layer and the final norm on its own (regional compilation; the layers share one graph, so it
    compiles once, not once per layer).

    Inductor fuses what eager runs as separate memory-bound passes: the norms, rotary, SwiGLU and
    autocast's casts. Packed attention (`batching.packed_attention`, one sequence at a time) stays
    eager between the compiled parts of a layer, so packed micro-batches keep their attention
    boundaries. The vocabulary head stays eager too: it runs on target positions only
    (`loss.nll_sum`). The LoRA layers peft injects are inside the compiled modules, so adapters of
    any rank and mask train through them; a new rank or grad mode compiles a new graph once.
    Measured side by side with eager by `perfit bench speed`."""
    decoder = model.get_decoder()
    if decoder in _COMPILED:
        return
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None:  # another layout: the whole decoder, breaking its graph at packed attention
        decoder.compile(dynamic=True)
    else:
        for module in [*layers, *([norm] if norm is not None else [])]:
            module.compile(dynamic=True)
    _COMPILED.add(decoder)


def decoder_compiled(model: Any) -> bool:
    """Whether `compile_decoder` has compiled this model's decoder."""
    return model.get_decoder() in _COMPILED


def attach_lora(model: Any, rank: int, alpha: float) -> Any:
    """Wrap `model` in a peft LoRA of this rank, replacing an earlier wrap of another rank."""
    from peft import PeftModel

    current = _LORA.get(model)
    if (
        current is not None
        and current.peft_config["default"].r == rank
        and current.peft_config["default"].lora_alpha == alpha
    ):
        return current
    base = current.unload() if isinstance(current, PeftModel) else model
    wrapped = wrap_lora(base, rank, alpha)
    _LORA[model] = wrapped
    return wrapped


def lora_parameters(peft_model: Any) -> list[torch.nn.Parameter]:
    return [param for name, param in peft_model.named_parameters() if "lora_" in name]


def read_flat(peft_model: Any) -> torch.Tensor:
    """The adapter as one flat fp32 CPU tensor (what masks, aggregation and messages use)."""
    return torch.cat([p.detach().flatten() for p in lora_parameters(peft_model)]).cpu()


def write_flat(peft_model: Any, flat: torch.Tensor) -> None:
    start = 0
    with torch.no_grad():
        for param in lora_parameters(peft_model):
            param.copy_(flat[start : start + param.numel()].view_as(param))
            start += param.numel()
    if start != flat.numel():
        raise ValueError(f"flat adapter has {flat.numel()} values, model has {start}")
