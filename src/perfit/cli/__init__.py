"""The `perfit` command: a thin typer layer over the Python API and the bench. Each module registers
its commands on the one app: `run` (run, demo, config, fields), `use` (export, chat, join), `bench`
(bench speed / scale / masks / cross), `grid` (bench paper / tune, report)."""

from perfit.cli import run, use, bench, grid  # noqa: F401, I001 (each registers its commands, in this order)
from perfit.cli.base import app

__all__ = ["app"]
