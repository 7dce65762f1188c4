"""What `perfit bench speed --device cuda` needs on a GPU machine that has no Flower, no gguf and no
network, small enough to travel with the working tree (the device tool carries 64 MiB): the model's
config and tokenizer files and the data file (`pack`, here), then random weights of that
architecture written on the GPU machine itself (`weights`; the dequantized SmolLM2 weights are
514 MB). Throughput and MFU do not depend on the weights' values; the model directory's
`RANDOM_WEIGHTS` file says they are random, and the report repeats it.

    python benchmarks/device_kit.py pack --data ../shared/data/databricks-dolly-15k.jsonl --out .device-kit
    # on the GPU machine (`.device-kit` carried, torch, transformers and peft installed there):
    python3 benchmarks/device_kit.py weights .device-kit
    PYTHONPATH=src python3 -m perfit bench speed --device cuda --model .device-kit/model \\
        --data .device-kit/data.jsonl --out "$OUT"
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def pack(model: str, data: Path, out: Path) -> int:
    """Copy `model`'s files but its weights, and `data`, into `out`; the bytes written."""
    target = out / "model"
    if target.exists():  # a kit that travelled before: its random weights alone are 514 MB
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in sorted(Path(model).iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".index.json"):
            shutil.copyfile(path, target / path.name)
    shutil.copyfile(data, out / "data.jsonl")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def weights(kit: Path, seed: int = 0) -> Path:
    """Random weights (seeded) of the kit's model architecture, saved beside its config, marked random."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from perfit.bench.speed_device import RANDOM_WEIGHTS

    directory = kit / "model"
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    (directory / RANDOM_WEIGHTS).write_text(
        f"random (seed {seed}, transformers' initialisation) weights of the {config.model_type} architecture "
        f"in {directory / 'config.json'} ({params:,} parameters), written by benchmarks/device_kit.py: "
        "tokens/s and MFU do not depend on the weights' values; no perplexity is reported\n"
    )
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="Here: the model's config and tokenizer, and the data file.")
    packing.add_argument("--data", type=Path, required=True)
    packing.add_argument("--out", type=Path, default=Path(".device-kit"))
    packing.add_argument("--model", default=None, help="A model directory (default: the config's default model).")
    writing = verbs.add_parser("weights", help="There: random weights of the packed architecture.")
    writing.add_argument("kit", type=Path)
    args = parser.parse_args()
    if args.verb == "pack":
        from perfit.artifacts.base_model import resolve_model
        from perfit.config import make_config

        model = args.model or resolve_model(make_config(None, "paper", data=str(args.data)))
        print(f"{pack(model, args.data, args.out) / 2**20:.1f} MiB in {args.out}")
    else:
        print(f"random weights in {weights(args.kit)}")


if __name__ == "__main__":
    main()
