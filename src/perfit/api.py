"""perfit's Python API; the CLI is a thin layer over these functions.

import perfit
summary = perfit.run(preset="quick", method="perfit", data="dolly.jsonl", out="runs/p")
model, tokenizer = perfit.load_client_model("runs/p", client=3)
report = perfit.join("runs/p", data="owner.jsonl", out="runs/p-owner")
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from perfit.config import Config, make_config
from perfit.use.export import export_client, load_client_model
from perfit.use.join import join


def check_inputs(config: Config) -> None:
    """Validate the data and its split before anything runs (raises DataError naming file, line,
    field). Owners' files (`split=owner`) are counted here, not opened: only their clients read them,
    and a bad one stops the run before any output, naming file, line and field."""
    from perfit.client.data import DataError, load_rows, owner_files, partition
    from perfit.federation.run_directory import check_sources

    check_sources(config)  # the runs this one starts from or takes masks from: there and finished
    if config.split == "owner":
        files = owner_files(config.data)
        if len(files) != config.num_clients:
            raise DataError(f"{config.data}: {len(files)} owner files, but num_clients is {config.num_clients}")
        return
    partition(load_rows(config.data), config)


def run(config: Config | Mapping[str, Any] | str | Path | None = None, preset: str | None = None, **fields) -> dict:
    """Run one federation (any `Config.method`: FIT, PerFIT or a baseline) on Flower's simulation
    engine in this process; returns the summary also written to `<out>/summary.json`."""
    from perfit.federation.simulation import run_simulation

    resolved = make_config(config, preset, **fields)
    check_inputs(resolved)
    return run_simulation(resolved)


__all__ = ["Config", "check_inputs", "export_client", "join", "load_client_model", "make_config", "run"]
