"""Finished runs as the grids leave them, written by hand for the report and grid tests."""

import json
from pathlib import Path

from perfit.bench.experiments import grid


def fake_run(directory: Path, ppl: float | None, wall=10.0, losses=(3.0, 2.5), lr=3e-4, cell=None, **extra) -> None:
    """A finished run as the grid leaves it (a diverged run's perplexity is written as null) of `cell`
    (by default the grid cell its directory names)."""
    directory.mkdir(parents=True, exist_ok=True)
    cell = cell or next(c for c in grid() if c.name == "/".join(directory.parts[-4:-1]))
    root = directory.parents[len(cell.name.split("/"))]
    config = cell.config(int(directory.name.removeprefix("seed")), root, data="d.jsonl")
    (directory / "config.toml").write_text(config.replace(lr=lr).to_toml())
    summary = {
        "personalized_ppl": ppl,
        "wall_seconds": wall,
        "per_client_ppl": {"0": ppl},
        "trainable_params_per_client": {"0": 100},
        "search_seconds": 4.0,
        **extra,
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    metrics = [{"round": i + 1, "train_loss": v} for i, v in enumerate(losses)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def personal_runs(runs: Path, values: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]) -> None:
    """Fake held-out runs of the pathological split: label -> (perplexity, ROUGE-L) at seeds 1-3."""
    from perfit.bench.experiments import GRIDS

    cells = {c.name: c for c in GRIDS["personal"]()}
    for label, (ppls, rouges) in values.items():
        name = f"personal/pathological/{label}"
        for seed, ppl, rouge in zip((1, 2, 3), ppls, rouges, strict=True):
            fake_run(runs / name / f"seed{seed}", ppl, cell=cells[name], rouge_l=rouge)
