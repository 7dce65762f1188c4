"""The paper's experiments at laptop scale as one resumable grid (`perfit bench paper`).

Every cell is a method/setting; every (cell, seed) is its own run directory under `--out`
(`<out>/<cell>/seed<k>/`). A run with a `summary.json` is finished and skipped; one with only a
checkpoint is resumed; `--cells` selects cells by glob (`table1/*`, `*/dirichlet/*`).

Scale. The grid runs at the `quick` preset (8 clients, 4 per round, 3 rounds, 32 rows per client of
which 26 train / 6 held out, 256 tokens, batch 8, T_p 5 x 1 scoring micro-batch), a few minutes a run
on these 2-core machines, completed over several sittings (timings in docs/results.md). The
paper's setting (100 clients, 10 per round, 30-50 rounds, batch 64) is the `paper` preset and needs a
GPU. Everything but the scale follows the paper: rank-8 budget on q/k/v, dolly-15k's 8 categories
split 2 per client or by Dirichlet(0.5), 20 % of each client's rows held out for personalized
perplexity, the same seeds for every method.
"""

from __future__ import annotations

import fnmatch
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from perfit.config import Config, make_config

SCALE_PRESET = "quick"
GRID_LR = 3e-4
"""The grid's learning rate (the one every grid run used, under the quick preset's rate before it was
tuned); a `--lr` among the common settings or a cell's tuned rate (`--tuned`) replaces it."""
SEEDS = (0, 1)
SPLITS = ("pathological", "dirichlet")
SPLIT_TITLES = {"pathological": "pathological (2 of 8 categories)", "dirichlet": "Dirichlet(0.5)"}
"""How the report names the splits."""
LABELS = {
    "fit": "FIT (r=8)",
    "perfit-s0.33": "PerFIT s=0.33 (dense r 12)",
    "perfit-s0.5": "PerFIT s=0.5 (dense r 16)",
    "perfit-s0.66": "PerFIT s=0.66 (dense r 24)",
    "perfit-s0.5-zero-b": "PerFIT s=0.5, train from B=0",
    "perfit-8-12-16": "PerFIT ranks 8/12/16",
    "hetlora-8-12-16": "HetLoRA ranks 8/12/16",
    "local": "local only (r=8)",
    "fit-ft": "FIT + local fine-tuning",
    "fedsa": "FedSA-LoRA (r=8)",
    "perfit": "PerFIT s=0.5 (the paper's)",
    "perfit-zero-b": "PerFIT s=0.5, train from B=0",
    "perfit-4": "PerFIT s=0.5, 4 scoring micro-batches, train from B=0",
    "perfit-gradient-4": "PerFIT s=0.5, |g| scores of 4 micro-batches, train from B=0",
}
"""How the report names a cell (by the last part of its name)."""
PERSONALIZED_BASELINES = ("local", "fit-ft", "fedsa")
"""The baselines that end with a model of each client's own, which PerFIT is set against."""
SPARSITIES = (0.33, 0.5, 0.66)
HETERO_BUDGETS = "8,12,16"
GRID_FREE_FIELDS = ("data", "model", "cache_dir", "dtype", "device", "torch_compile", "onednn")
"""The only fields a grid command may set for every cell; the cells fix the rest."""


@dataclass(frozen=True)
class Cell:
    """One setting of the grid, run once per seed."""

    name: str  # "<group>/<split>/<label>", also its directory under the grid's out
    group: str
    split: str
    label: str
    fields: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = SEEDS
    preset: str = SCALE_PRESET
    start: str = ""
    """The name of the cell whose run of the same seed, under the same grid directory, this cell's
    runs start from (`Config.start_from`: its final global adapter); empty: none."""
    masks: str = ""
    """The name of the cell whose run of the same seed, under the same grid directory, searched the
    masks this cell's runs keep (`Config.masks_from`); empty: they search their own."""

    def config(self, seed: int, out: Path, **common: Any) -> Config:
        rate = {"lr": GRID_LR} if self.preset == SCALE_PRESET else {}  # other presets carry their own
        # absolute: a resumed run's config names the same runs whatever the working directory
        sources = {field: str((out / name / f"seed{seed}").resolve()) for field, name in self.sources.items()}
        values = {**rate, **common, "split": self.split, **self.fields, **sources, "seed": seed,
                  "out": str(self.run_dir(out, seed))}  # fmt: skip
        return make_config(None, self.preset, **values)

    @property
    def sources(self) -> dict[str, str]:
        """The config fields that name another cell's run, by that cell's name."""
        return {field: name for field, name in (("start_from", self.start), ("masks_from", self.masks)) if name}

    def run_dir(self, out: Path, seed: int) -> Path:
        return out / self.name / f"seed{seed}"


def _cell(group: str, split: str, label: str, seeds: tuple[int, ...] = SEEDS, **fields: Any) -> Cell:
    if fields.get("method") == "perfit":  # the paper's PerFIT unless the cell says otherwise (the
        fields = {"init": "symmetric", **fields}  # package's default init is symmetric_then_zero_b)
    return Cell(f"{group}/{split}/{label}", group, split, label, fields, seeds)


def grid() -> list[Cell]:
    """Every cell, the main tables (2 seeds) first, then figures and ablations (seed 0)."""
    cells = []
    for split in SPLITS:
        cells.append(_cell("table1", split, "fit", method="fit"))
        cells += [_cell("table1", split, f"perfit-s{s}", method="perfit", sparsity=s) for s in SPARSITIES]
        # the change the ablations point to: search at the symmetric init, train from B = 0
        cells.append(_cell("table1", split, "perfit-s0.5-zero-b", method="perfit", init="symmetric_then_zero_b"))
        cells.append(_cell("table2", split, "perfit-8-12-16", method="perfit", budgets=HETERO_BUDGETS))
        cells.append(_cell("table2", split, "hetlora-8-12-16", method="hetlora", budgets=HETERO_BUDGETS))
        cells.append(_cell("baselines", split, "local", method="local"))
        cells.append(_cell("baselines", split, "fit-ft", method="fit", finetune_epochs=1))
        cells.append(_cell("baselines", split, "fedsa", method="fedsa"))
    one = (0,)
    for split in SPLITS:  # Fig. 7: importance metric (first is table1's perfit-s0.5)
        cells += [_cell("metric", split, f"perfit-{m}", one, method="perfit", metric=m) for m in ("second", "mixed")]
    for share, per_round in ((5, 1), (10, 2), (20, 4)):  # Fig. 6: participation, 20 clients, Dirichlet
        for method in ("fit", "perfit"):
            cells.append(
                _cell(
                    "participation",
                    "dirichlet",
                    f"{method}-p{share}",
                    one,
                    method=method,
                    num_clients=20,
                    clients_per_round=per_round,
                )
            )
    ablations = {
        "init-symmetric_then_zero_b": {"init": "symmetric_then_zero_b"},
        "init-peft": {"init": "peft"},
        "aggregation-literal": {"aggregation": "literal"},
        "scope-per_module": {"scope": "per_module"},
        "tp-1": {"prune_iterations": 1},
        "tp-10": {"prune_iterations": 10},
        "search-batches-4": {"search_batches": 4},
        "alpha-16": {"lora_alpha": 16.0},
        "alpha-64": {"lora_alpha": 64.0},
    }
    # against table1's perfit-s0.5 (symmetric, shared, global, T_p 5, 1 scoring batch, alpha 32)
    for label, fields in ablations.items():
        cells.append(_cell("ablation", "pathological", label, one, method="perfit", **fields))
    return cells


PERSONAL_PRESET = "medium"
HELD_OUT_SEEDS = (1, 2, 3)
"""The personalization grid's reported seeds; seed 0 is its tuning seed (`validation=1`: the rates
and the PerFIT variant are chosen there, on no row that is reported)."""
PERSONAL_ROUGE_SAMPLES = 6
"""Held-out rows per client whose greedy answers the personalization grid scores with ROUGE-L (60 a
run of 10 clients). Tuning runs score perplexity only (`bench.tuning.tuning_cells`)."""
PERSONAL_VARIANTS = {
    "perfit": {"init": "symmetric"},
    "perfit-zero-b": {"init": "symmetric_then_zero_b"},
    "perfit-4": {"init": "symmetric_then_zero_b", "search_batches": 4},
    "perfit-gradient-4": {"init": "symmetric_then_zero_b", "metric": "gradient", "search_batches": 4},
}
"""PerFIT as the paper reads (symmetric init), then the candidates beyond it, which seed 0's
validation slice chooses among: train from B = 0 (the package's default), score more of the
client's rows at each pruning step (4 micro-batches), and score those with |g| alone
(`core.importance.gradient_magnitude`). |g| on one micro-batch is not a candidate: at the quick
scale its masks followed the data no better than Eq. 2's, and tuning it would cost 3 runs a split.
What each did to the masks is in docs/experiments.md (`perfit bench masks` still measures any)."""


def personalization_grid() -> list[Cell]:
    """Does personalization pay at the paper's data per client (the `medium` preset)? Every method
    that ends with a model per client, and FIT, at equal trainable parameters; heterogeneous budgets
    PerFIT against HetLoRA. Reported on HELD_OUT_SEEDS."""
    cells = []
    for split in SPLITS:
        cells.append(_personal(split, "fit", method="fit"))
        # FIT's final adapter of the same seed, fine-tuned by each client: the federation is not rerun
        fit_ft = _personal(split, "fit-ft", method="fit", finetune_epochs=1, rounds=0)
        cells.append(replace(fit_ft, start=f"personal/{split}/fit"))
        cells.append(_personal(split, "local", method="local"))
        cells.append(_personal(split, "fedsa", method="fedsa"))
        for label, fields in PERSONAL_VARIANTS.items():
            variant = _personal(split, label, method="perfit", **fields)
            # trained from B = 0, searched as the paper's PerFIT: it keeps that cell's masks
            cells.append(replace(variant, masks=f"personal/{split}/perfit") if label == "perfit-zero-b" else variant)
        hetero = {"budgets": HETERO_BUDGETS, "init": "symmetric_then_zero_b"}
        cells.append(_personal(split, "perfit-8-12-16", method="perfit", **hetero))
        cells.append(_personal(split, "hetlora-8-12-16", method="hetlora", budgets=HETERO_BUDGETS))
    return cells


def _personal(split: str, label: str, **fields: Any) -> Cell:
    fields = {**fields, "rouge_samples": PERSONAL_ROUGE_SAMPLES}
    return Cell(f"personal/{split}/{label}", "personal", split, label, fields, HELD_OUT_SEEDS, PERSONAL_PRESET)


GRIDS: dict[str, Callable[[], list[Cell]]] = {"paper": grid, "personal": personalization_grid}
"""`perfit bench paper --grid NAME`: the paper's experiments at the quick scale, or the
personalization comparison at the paper's data per client."""


def select(cells: list[Cell], patterns: list[str]) -> list[Cell]:
    """Cells whose name matches any glob pattern (all when there are none); an unmatched pattern is an error."""
    if not patterns:
        return cells
    for pattern in patterns:
        if not any(fnmatch.fnmatch(c.name, pattern) for c in cells):
            raise ValueError(f"--cells {pattern!r} matches no cell; see `perfit bench paper --list`")
    return [c for c in cells if any(fnmatch.fnmatch(c.name, p) for p in patterns)]


def schedule(cells: list[Cell]) -> Iterator[tuple[Cell, int]]:
    """(cell, seed) in run order: every cell's first seed before any cell's second one, the tables
    first within a seed, so a partial grid already has one seed of everything (the ablations explain
    the tables) before it adds the spread."""
    main = [c for c in cells if len(c.seeds) > 1]
    single = [c for c in cells if len(c.seeds) <= 1]
    for index in range(max((len(c.seeds) for c in cells), default=0)):
        for cell in main + single:
            if index < len(cell.seeds):
                yield cell, cell.seeds[index]


def state(cell: Cell, out: Path, seed: int) -> str:
    """`done`, `partial` (checkpoint, resumable) or `todo`."""
    directory = cell.run_dir(out, seed)
    if (directory / "summary.json").is_file():
        return "done"
    return "partial" if (directory / "checkpoint.safetensors").is_file() else "todo"


def run_kind(cell: Cell) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """What a run's cost depends on: its cell's fields but the learning rate, and which fields name
    a finished run it builds on (masks kept: no search; a start with no rounds: no federation)."""
    return tuple(sorted((k, str(v)) for k, v in cell.fields.items() if k != "lr")), tuple(sorted(cell.sources))


def remaining_seconds(finished: list[tuple[Any, float]], pending: list[Any]) -> float | None:
    """The wall seconds `pending` runs (their `run_kind`s) may take, each at the mean wall time of
    the `finished` (kind, seconds) of its kind, else of its method building on the same runs (FIT +
    FT's fine-tuning from FIT's run is not a federation), else of its method, else of every finished
    run; None while no run has finished. A resumable run counts whole: an estimate on the safe side."""
    if not finished:
        return None

    def coarser(kind: Any) -> tuple[Any, ...]:
        method = dict(kind[0]).get("method", "")
        return kind, (method, kind[1]), method

    groups: dict[Any, list[float]] = {}
    for kind, wall in finished:
        for key in coarser(kind):
            groups.setdefault(key, []).append(wall)
    total = 0.0
    for kind in pending:
        seconds = next((groups[key] for key in coarser(kind) if key in groups), [wall for _, wall in finished])
        total += sum(seconds) / len(seconds)
    return total


def progress(cells: list[Cell], out: Path) -> tuple[int, int, float, float | None]:
    """(runs finished, runs in all, their wall seconds, the estimate for the rest) of `cells` under
    `out`, from the finished runs' summaries (`remaining_seconds`)."""
    from perfit.federation.run_directory import read_summary

    finished, pending = [], []
    for cell, seed in schedule(cells):
        if state(cell, out, seed) == "done":
            finished.append(
                (run_kind(cell), float(read_summary(cell.run_dir(out, seed) / "summary.json")["wall_seconds"]))
            )
        else:
            pending.append(run_kind(cell))
    runs = len(finished) + len(pending)
    return len(finished), runs, sum(wall for _, wall in finished), remaining_seconds(finished, pending)


def _finished_with_files(run_dir: Path) -> bool:
    """A finished run that another can build on: not a copy from a record without its large files."""
    from perfit.bench.record import is_copy

    return (run_dir / "summary.json").is_file() and not is_copy(run_dir)


def _finished_outcome(config: Config) -> str:
    """A finished run's outcome in a grid: "skipped (finished)", or "failed: ..." where it finished
    under another config than `config` (e.g. `--tuned` into a directory of default-rate runs): it is
    neither rerun nor counted."""
    from perfit.federation.run_directory import config_changes

    changes = config_changes(Path(config.out), config) if (Path(config.out) / "config.toml").is_file() else []
    if changes:
        return f"failed: finished with another config ({'; '.join(changes)}); kept, not rerun: use another --out"
    return "skipped (finished)"


def run_grid(
    cells: list[Cell],
    out: Path,
    common: dict[str, Any],
    runner: Callable[[Config], dict[str, Any]],
    report: Callable[[str], None] = print,
    record: Path | None = None,
) -> list[tuple[Cell, int, str]]:
    """Run every unfinished (cell, seed) with `runner`; returns what happened to each. A run that
    raises is reported as `failed: ...` and the grid goes on with the next one. `record`: where each
    finished run's small files are kept as it ends (`bench.record`)."""
    from perfit.core.methods import resume_reads_nodes
    from perfit.federation.run_directory import NODES

    done = []
    for cell, seed in schedule(cells):
        status = state(cell, out, seed)
        config = cell.config(seed, out, **common, resume=int(status == "partial"))
        if status == "partial" and resume_reads_nodes(config.method) and not (Path(config.out) / NODES).is_dir():
            report(f"{cell.name} seed {seed}: restarting (stopped before its nodes kept their values on disk)")
            status, config = "todo", config.replace(resume=0)
        if status == "done":
            outcome = _finished_outcome(config)
            if outcome.startswith("failed"):
                report(f"{cell.name} seed {seed}: {outcome.removeprefix('failed: ')}")
            done.append((cell, seed, outcome))
            continue
        failed_here = {(c.name, s) for c, s, w in done if w.startswith("failed")}  # e.g. finished under another config
        waits = [  # a partial run resumes from its checkpoint, which holds what it took from them
            getattr(config, field)
            for field, name in cell.sources.items()
            if status != "partial"
            and ((name, seed) in failed_here or not _finished_with_files(Path(getattr(config, field))))
        ]
        if waits:
            what = f"waits for {', '.join(waits)} (the run it builds on) to finish"
            report(f"{cell.name} seed {seed}: {what}")
            done.append((cell, seed, f"failed: {what}"))
            continue
        if status == "todo" and Path(config.out).exists():  # died before its first checkpoint, or restarts
            shutil.rmtree(config.out)
        report(f"{cell.name} seed {seed}: {'resuming' if status == 'partial' else 'running'}")
        try:
            summary = runner(config)
        except Exception as err:  # one failed run must not stop a grid of hours; the others go on
            report(f"{cell.name} seed {seed}: FAILED ({type(err).__name__}: {err})")
            done.append((cell, seed, f"failed: {type(err).__name__}: {err}"))
            continue
        ppl = summary.get("personalized_ppl")
        ppl_text = f"{ppl:.3f}" if ppl is not None and math.isfinite(ppl) else "n/a (diverged)"
        report(f"{cell.name} seed {seed}: personalized ppl {ppl_text} in {summary['wall_seconds']:.0f} s")
        if record is not None:
            from perfit.bench.record import keep

            try:
                keep(Path(config.out), out, record)
            except Exception as err:  # the run is finished; the next command with the record keeps it
                report(f"{cell.name} seed {seed}: not kept in {record} ({type(err).__name__}: {err})")
        done.append((cell, seed, "ran"))
    return done
