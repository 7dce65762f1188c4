"""The run directory: config.toml, partitions.json, metrics.jsonl, summary.json, masks, adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from perfit.config import Config
from perfit.data import ClientSplit
from perfit.model import Layout, save_adapter


class RunDirectory:
    """Writes a run's outputs under `config.out`; created only once the inputs validated."""

    def __init__(self, config: Config) -> None:
        self.path = Path(config.out).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.toml").write_text(config.to_toml())
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")

    def write_partitions(self, splits: dict[int, ClientSplit]) -> None:
        data = {str(c): {"train": s.train, "eval": s.eval} for c, s in sorted(splits.items())}
        (self.path / "partitions.json").write_text(json.dumps(data))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_finite(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")

    def write_masks(self, masks: dict[int, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {f"client_{c}": m.to(torch.uint8).contiguous() for c, m in sorted(masks.items())}
        if tensors:
            save_file(tensors, str(self.path / "masks.safetensors"))

    def write_adapters(
        self, layout: Layout, flats: dict[int, torch.Tensor], rank: int, alpha: float, base_path: str
    ) -> None:
        for client, flat in sorted(flats.items()):
            save_adapter(self.path / "adapters" / f"client_{client}", layout, flat, rank, alpha, base_path)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
