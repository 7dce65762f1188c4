"""The grid's record: what of a finished run outlives the machine it ran on.

A grid runs for more hours than a machine lives: a sitting ends, and the next one may start from a
fresh checkout with no `runs/`. So a finished run's small files (`KEPT`: its config, summary,
partitions, metrics, cross-evaluation and mask readings) are copied into a directory committed with the project
(`--record`, e.g. docs/runs/tune-personal), and copied back into an empty `runs/` before the grid
goes on: only the runs no record holds run again.

The large files (checkpoints, adapters, masks: megabytes a run) are not kept. A finished run that a
run still to go builds on (`Cell.sources`: FIT's final adapter for FIT + local fine-tuning, a search's
masks) is therefore not restored but run again, with the run that needs it (`restore`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from perfit.federation.run_directory import CHECKPOINT

KEPT = ("config.toml", "summary.json", "partitions.json", "metrics.jsonl", "cross.json", "base.json", "masks.json")
"""The files a record keeps of a run: what tuning, progress and the report read (kilobytes), the
masks' readings (`bench.diagnostics.keep_mask_readings`) instead of the masks."""


def _relative(run_dir: Path, out: Path) -> Path:
    try:
        return Path(run_dir).resolve().relative_to(Path(out).resolve())
    except ValueError as err:
        raise ValueError(f"{run_dir}: not a run under the grid directory {out}") from err


def keep(run_dir: Path, out: Path, record: Path) -> bool:
    """Copy a finished run's KEPT files into `record`, at its path under `out`; False (nothing
    copied) for a run without a summary.json, i.e. unfinished. Each file is written aside and renamed
    into place: a lane reading the record never sees half a file."""
    from perfit.bench.diagnostics import keep_mask_readings

    if not (Path(run_dir) / "summary.json").is_file():
        return False
    keep_mask_readings(run_dir)
    target = Path(record) / _relative(run_dir, out)
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (Path(run_dir) / name).is_file():
            staging = target / f".{name}.{os.getpid()}"
            shutil.copy2(Path(run_dir) / name, staging)
            os.replace(staging, target / name)
    return True


def keep_all(out: Path, record: Path) -> int:
    """`keep` every finished run under `out` (a cross-evaluation written since included); their number.
    Hidden directories (a copy being put back by another process) are passed over."""
    summaries = sorted(Path(out).rglob("summary.json"))
    hidden = [s for s in summaries if any(part.startswith(".") for part in s.relative_to(out).parts)]
    return sum(keep(summary.parent, out, record) for summary in summaries if summary not in hidden)


RESTORED = ".restored"
"""The mark `restore` leaves in a run directory it put back: a copy without the run's large files."""


def is_copy(run_dir: Path) -> bool:
    """Whether a run directory is a copy put back from a record (`restore`), not the run itself."""
    return (Path(run_dir) / RESTORED).is_file()


def restore(runs: Iterable[tuple[Any, int]], out: Path, record: Path) -> tuple[list[Path], list[Path]]:
    """Put back into `out` each run of `runs` ((cell, seed), cells as `bench.experiments.Cell`) that
    `record` holds finished and `out` does not; returns (restored, to run again).

    To run again: a recorded run that a run still to go builds on (`Cell.sources`), since the
    record does not keep the large files that run reads. It is not restored, and a copy restored
    earlier (`is_copy`) is removed; it counts as still to go, so the runs it builds on are held back
    too. A run in `out` with its large files, or a partial one (a checkpoint), is never touched.
    A copy is put together aside and renamed into place."""
    runs = list(runs)

    def name(cell: Any, seed: int) -> tuple[str, int]:
        return cell.name, seed

    def finished(directory: Path) -> bool:
        return (directory / "summary.json").is_file()

    recorded = {name(c, s) for c, s in runs if finished(Path(record) / c.name / f"seed{s}")}
    here = {name(c, s): c.run_dir(out, s) for c, s in runs}
    complete = {key for key, directory in here.items() if finished(directory) and not is_copy(directory)}
    again: set[tuple[str, int]] = set()
    while True:  # a run run again needs its own sources' large files in turn
        to_go = {key for key in here if key not in complete and (key not in recorded or key in again)}
        needed = {(source, s) for c, s in runs if name(c, s) in to_go for source in c.sources.values()}
        more = {key for key in needed if key in here and key not in complete} - again
        if not more:
            break
        again |= more
    restored, rerun = [], []
    for c, s in runs:
        key, directory = name(c, s), here[name(c, s)]
        if key in again:
            if finished(directory) and is_copy(directory):
                shutil.rmtree(directory)
            if key in recorded:
                rerun.append(directory)
        elif key in recorded and not finished(directory):
            if (directory / CHECKPOINT).is_file():  # a partial run resumes: its work is never thrown away
                continue
            if directory.exists():  # died before its first checkpoint: nothing to lose
                shutil.rmtree(directory)
            staging = directory.with_name(f".{directory.name}.restoring.{os.getpid()}")
            shutil.copytree(Path(record) / c.name / f"seed{s}", staging)
            (staging / RESTORED).write_text(f"put back from {Path(record) / c.name / f'seed{s}'}\n")
            _moved(staging, c, s, directory, out)
            os.replace(staging, directory)
            restored.append(directory)
    return restored, rerun


def _moved(config_dir: Path, cell: Any, seed: int, run_dir: Path, out: Path) -> None:
    """Point a restored run's config.toml (in `config_dir`) at where it now is: its `out` (`run_dir`),
    and the runs it built on (`start_from`, `masks_from`) at their place under `out`, as
    `Cell.config` names them; a later command then finds it run with the config it asks for,
    whichever directory the checkout or the grid sits in."""
    from perfit.config import from_toml

    path = Path(config_dir) / "config.toml"
    if not path.is_file():
        return
    config = from_toml(path)
    changes = {"out": str(Path(run_dir).resolve())}
    for field, source in cell.sources.items():
        if getattr(config, field):
            changes[field] = str((Path(out) / source / f"seed{seed}").resolve())
    path.write_text(config.replace(**changes).to_toml())
