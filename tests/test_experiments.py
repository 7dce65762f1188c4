"""The resumable paper grid and its report: cell selection and order, skip/resume, the headline
ratios and the seed-spread rule on hand-made summaries, and one real cell end to end on the tiny Llama."""

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from perfit.bench.experiments import GRIDS, grid, run_grid, schedule, select, state
from perfit.bench.personal_report import HEADING
from perfit.bench.report import write_report
from perfit.bench.results import CellResult, exceeds_spread, headline, load_results, paired_changes


def test_the_personalization_grid_holds_the_paper_data_per_client(tmp_path):
    """`--grid personal`: the medium preset gives each client what a client of the paper's
    100-client split holds (120 train / 30 held-out dolly rows) and the paper's proportions; its
    reported seeds never include seed 0, where rates and the PerFIT variant are chosen."""
    from perfit.bench.experiments import GRIDS, HELD_OUT_SEEDS
    from perfit.client.data import load_rows, partition

    from .conftest import DOLLY, dolly_rows

    cells = GRIDS["personal"]()
    assert len({c.name for c in cells}) == len(cells) == 20
    assert all(c.seeds == HELD_OUT_SEEDS and 0 not in c.seeds for c in cells)
    for split in ("pathological", "dirichlet"):
        for label in ("fit", "fit-ft", "local", "fedsa", "perfit", "perfit-8-12-16", "hetlora-8-12-16"):
            assert f"personal/{split}/{label}" in {c.name for c in cells}
    config = select(cells, ["personal/pathological/fit"])[0].config(1, tmp_path, data=str(DOLLY))
    assert (config.num_clients, config.clients_per_round, config.rounds, config.batch_size) == (10, 3, 10, 64)
    assert config.rounds * config.clients_per_round / config.num_clients == 3  # as the paper's 30 rounds x 10 %
    assert config.lr == 3e-3  # the preset's own rate, not the quick grid's
    gradient = select(cells, ["personal/dirichlet/perfit-gradient-4"])[0].config(2, tmp_path)
    assert (gradient.metric, gradient.dense_rank, gradient.pruning_steps) == ("gradient", 16, 10)
    dolly_rows(1)  # skips (or, under CI, fails) without the dolly file
    rows = load_rows(str(DOLLY))
    for split in ("pathological", "dirichlet"):
        sizes = {(len(s.train), len(s.eval)) for s in partition(rows, config.replace(split=split)).values()}
        assert sizes == {(120, 30)}, sizes  # every client: the paper's share, 80/20


def test_grid_names_are_unique_and_cover_the_issue():
    cells = grid()
    names = [c.name for c in cells]
    assert len(names) == len(set(names))
    for split in ("pathological", "dirichlet"):
        for label in ("fit", "perfit-s0.33", "perfit-s0.5", "perfit-s0.66"):
            assert f"table1/{split}/{label}" in names
        for label in ("local", "fit-ft", "fedsa"):
            assert f"baselines/{split}/{label}" in names
        assert f"table2/{split}/hetlora-8-12-16" in names
    main = [c for c in cells if c.group in ("table1", "table2", "baselines")]
    assert all(c.seeds == (0, 1) for c in main)
    config = select(cells, ["table1/dirichlet/perfit-s0.66"])[0].config(1, Path("g"), data="d.jsonl")
    assert (config.method, config.split, config.sparsity, config.seed, config.dense_rank) == (
        "perfit",
        "dirichlet",
        0.66,
        1,
        24,
    )
    assert config.out == str(Path("g") / "table1/dirichlet/perfit-s0.66" / "seed1")


def test_select_and_schedule_order():
    cells = grid()
    chosen = select(cells, ["table1/pathological/*", "ablation/*/tp-1"])
    assert {c.name for c in chosen} == {
        "table1/pathological/fit",
        "table1/pathological/perfit-s0.33",
        "table1/pathological/perfit-s0.5",
        "table1/pathological/perfit-s0.66",
        "table1/pathological/perfit-s0.5-zero-b",
        "ablation/pathological/tp-1",
    }
    order = [(c.name, s) for c, s in schedule(chosen)]
    assert order[:5] == [(c.name, 0) for c in chosen[:5]]  # every table cell's seed 0 first
    assert order[5] == ("ablation/pathological/tp-1", 0)  # then one seed of the rest
    assert order[6:] == [(c.name, 1) for c in chosen[:5]]
    with pytest.raises(ValueError, match="matches no cell"):
        select(cells, ["table9/*"])


def _fake_run(directory: Path, ppl: float | None, wall=10.0, losses=(3.0, 2.5), lr=3e-4, cell=None, **extra) -> None:
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


def test_run_grid_skips_finished_resumes_partial_and_restarts_dead(tmp_path):
    cells = select(grid(), ["table1/pathological/fit"])
    cell = cells[0]
    _fake_run(cell.run_dir(tmp_path, 0), 10.0)
    partial = cell.run_dir(tmp_path, 1)
    partial.mkdir(parents=True)
    (partial / "checkpoint.safetensors").write_bytes(b"x")
    assert (state(cell, tmp_path, 0), state(cell, tmp_path, 1)) == ("done", "partial")
    seen = []

    def runner(config):
        seen.append((config.seed, config.resume))
        return {"personalized_ppl": 9.0, "wall_seconds": 1.0}

    log = run_grid(cells, tmp_path, {"data": "d.jsonl"}, runner, report=lambda text: None)
    assert seen == [(1, 1)]
    assert [status for _, _, status in log] == ["skipped (finished)", "ran"]
    (partial / "checkpoint.safetensors").unlink()
    (partial / "stale.txt").write_text("died before its first checkpoint")
    seen.clear()
    run_grid(cells, tmp_path, {"data": "d.jsonl"}, runner, report=lambda text: None)
    assert seen == [(1, 0)] and not (partial / "stale.txt").exists()


def test_remaining_seconds_by_kind_then_method_then_all():
    from perfit.bench.experiments import remaining_seconds

    fit, fit_ft, perfit, fedsa = ((("method", "fit"),), ()), ((("method", "fit"),), ("start_from",)), (
        (("method", "perfit"),), ()), ((("method", "fedsa"),), ())  # fmt: skip
    finished = [(fit, 100.0), (fit, 300.0), (fit_ft, 40.0), (perfit, 900.0)]
    assert remaining_seconds(finished, [fit, fit_ft, perfit]) == 200.0 + 40.0 + 900.0  # each its kind's mean
    four_runs = (100 + 300 + 40 + 900) / 4
    other_fit = ((("method", "fit"), ("split", "x")), ())
    assert remaining_seconds(finished, [other_fit]) == 200.0  # its method's federations, not its fine-tuning
    assert remaining_seconds(finished, [((("method", "fit"),), ("masks_from",))]) == 440.0 / 3  # its method's
    assert remaining_seconds(finished, [fedsa, fedsa]) == 2 * four_runs  # no run of its method: every run's
    other_ft = ((("method", "fit"), ("rouge_samples", "6")), ("start_from",))
    assert remaining_seconds(finished, [other_ft]) == 40.0  # a fine-tuning run like the fine-tuning runs
    assert remaining_seconds(finished, []) == 0.0 and remaining_seconds([], [fit]) is None


def test_progress_counts_finished_runs_and_estimates_the_rest(tmp_path):
    from perfit.bench.experiments import progress

    cells = select(GRIDS["personal"](), ["personal/pathological/fit", "personal/pathological/fit-ft"])
    fit, fit_ft = cells
    _fake_run(fit.run_dir(tmp_path, 1), 10.0, wall=600.0, cell=fit)
    _fake_run(fit.run_dir(tmp_path, 2), 10.0, wall=800.0, cell=fit)
    _fake_run(fit_ft.run_dir(tmp_path, 1), 9.0, wall=50.0, cell=fit_ft)
    runs = len(fit.seeds) + len(fit_ft.seeds)  # the rest: FIT's at 700 s a run, FIT + FT's at 50 s
    assert progress(cells, tmp_path) == (3, runs, 1450.0, 700.0 * (len(fit.seeds) - 2) + 50.0 * (len(fit_ft.seeds) - 1))


def test_a_partial_run_of_a_method_whose_clients_keep_values_resumes_only_with_its_nodes_state(tmp_path):
    """FedSA-LoRA's B lives on the simulated nodes only (`<run>/nodes/`): a partial run that has it
    resumes; one stopped before nodes kept their values on disk restarts, since resuming from the
    server's checkpoint would start every client's B again from 0 in the middle of the run, silently."""
    from perfit.config import Config
    from perfit.federation.simulation import run_simulation

    cell = select(GRIDS["personal"](), ["personal/pathological/fedsa"])[0]
    partial = cell.run_dir(tmp_path, 1)
    partial.mkdir(parents=True)
    (partial / "checkpoint.safetensors").write_bytes(b"x")
    seen, lines = [], []

    def runner(config):
        seen.append((config.seed, config.resume, (Path(config.out) / "checkpoint.safetensors").exists()))
        return {"personalized_ppl": 9.0, "wall_seconds": 1.0}

    grid = [replace(cell, seeds=(1,))]
    run_grid(grid, tmp_path, {"data": "d.jsonl"}, runner, report=lines.append)
    assert seen == [(1, 0, False)]  # from round 1, the old checkpoint gone
    assert "restarting (stopped before its nodes kept their values on disk)" in lines[0]
    partial.mkdir(parents=True)
    (partial / "checkpoint.safetensors").write_bytes(b"x")
    config = Config(method="fedsa", resume=1, out=str(partial), data="d.jsonl")
    with pytest.raises(ValueError, match="a simulated fedsa run cannot resume without its nodes' kept values"):
        run_simulation(config)  # `perfit run --resume` says so before anything starts
    (partial / "nodes").mkdir()
    seen.clear()
    run_grid(grid, tmp_path, {"data": "d.jsonl"}, runner, report=lines.append)
    assert seen == [(1, 1, True)]  # its nodes' values are on disk: it resumes


def test_a_run_that_starts_from_another_waits_for_it_to_finish(tmp_path):
    """FIT + local fine-tuning starts from FIT's run of the same seed (no federation rerun); the grid
    runs FIT's seed first and reports the fine-tuning cell as waiting while FIT's run is unfinished."""
    cells = select(GRIDS["personal"](), ["personal/pathological/fit", "personal/pathological/fit-ft"])
    seen, lines = [], []

    def runner(config):
        seen.append((config.method, config.seed, config.rounds, config.start_from))
        if config.seed == 2 and config.rounds:  # FIT's seed 2 dies: its fine-tuning cannot start
            raise RuntimeError("killed")
        _fake_run(Path(config.out), 9.0, cell=next(c for c in cells if Path(config.out).parent.name == c.label))
        return {"personalized_ppl": 9.0, "wall_seconds": 1.0}

    # seed 3's FIT run finished under another config (another rate): reported, not started from
    _fake_run(cells[0].run_dir(tmp_path, 3), 9.0, cell=cells[0], lr=1e-2)
    log = run_grid(cells, tmp_path, {"data": "d.jsonl"}, runner, report=lines.append)
    fit_dir = str(tmp_path / "personal/pathological/fit/seed1")
    assert seen[:2] == [("fit", 1, 10, ""), ("fit", 1, 0, fit_dir)]
    assert [what.split(" ")[0] for _, _, what in log] == ["ran", "ran", "failed:", "failed:", "failed:", "failed:"]
    assert log[5][2].startswith("failed: waits for") and len(seen) == 3
    assert (
        log[3][2]
        == f"failed: waits for {tmp_path / 'personal/pathological/fit/seed2'} (the run it builds on) to finish"
    )


def test_a_finished_run_counts_whatever_working_directory_its_config_named_it_from(tmp_path):
    """A run started with a relative --out from another working directory records that relative
    path; given by its absolute path from here, it is the same run, not one of another config."""
    cell = select(grid(), ["table1/pathological/fit"])[0]
    _fake_run(cell.run_dir(tmp_path, 0), 10.0)
    config_file = cell.run_dir(tmp_path, 0) / "config.toml"
    config_file.write_text(config_file.read_text().replace(str(tmp_path), "elsewhere/grid"))
    assert 'out = "elsewhere/grid/' in config_file.read_text()
    log = run_grid([dataclasses.replace(cell, seeds=(0,))], tmp_path, {"data": "d.jsonl"}, pytest.fail, lambda _: None)
    assert [what for _, _, what in log] == ["skipped (finished)"]


def test_a_partial_run_resumes_without_the_run_it_built_on(tmp_path):
    """Its checkpoint holds what it took (FIT's adapter, the searched masks): a partial run resumes
    even where the run it started from is gone."""
    cell = select(GRIDS["personal"](), ["personal/dirichlet/perfit-zero-b"])[0]
    partial = cell.run_dir(tmp_path, 1)
    partial.mkdir(parents=True)
    (partial / "checkpoint.safetensors").write_bytes(b"x")
    seen = []

    def runner(config):
        seen.append((config.seed, config.resume, config.masks_from))
        return {"personalized_ppl": 9.0, "wall_seconds": 1.0}

    log = run_grid([dataclasses.replace(cell, seeds=(1, 2))], tmp_path, {"data": "d.jsonl"}, runner, lambda _: None)
    assert seen == [(1, 1, str(tmp_path / "personal/dirichlet/perfit/seed1"))]
    assert [what.split(" ")[0] for _, _, what in log] == ["ran", "failed:"]  # seed 2 waits for perfit's run


def test_a_failed_run_is_reported_and_the_grid_goes_on(tmp_path):
    cells = select(grid(), ["table1/pathological/fit", "table1/pathological/perfit-s0.5"])
    seen, lines = [], []

    def runner(config):
        seen.append((config.method, config.seed))
        if config.method == "fit" and config.seed == 0:
            raise ValueError("cannot resume with a different config (changed: data)")
        return {"personalized_ppl": 9.0, "wall_seconds": 1.0}

    log = run_grid(cells, tmp_path, {"data": "d.jsonl"}, runner, report=lines.append)
    assert seen == [("fit", 0), ("perfit", 0), ("fit", 1), ("perfit", 1)]  # every run was tried
    assert [what.split(":")[0] for _, _, what in log] == ["failed", "ran", "ran", "ran"]
    assert any("FAILED (ValueError: cannot resume" in line for line in lines)


def test_a_finished_run_of_another_config_is_kept_and_reported_not_counted(tmp_path):
    cells = select(grid(), ["table1/pathological/fit"])
    cell = cells[0]
    _fake_run(cell.run_dir(tmp_path, 0), 10.0, lr=3e-4)
    _fake_run(cell.run_dir(tmp_path, 1), 11.0, lr=3e-3)
    tuned = [dataclasses.replace(cell, fields={**cell.fields, "lr": 3e-3})]  # what `--tuned` runs
    lines = []
    log = run_grid(tuned, tmp_path, {"data": "d.jsonl"}, lambda config: pytest.fail("nothing to run"), lines.append)
    assert [what.split(" (")[0] for _, _, what in log] == ["failed: finished with another config", "skipped"]
    assert "lr: 0.0003 -> 0.003" in log[0][2] and any("use another --out" in line for line in lines)
    assert (cell.run_dir(tmp_path, 0) / "summary.json").is_file()  # kept


def test_a_diverged_run_is_reported_not_a_crash(tmp_path):
    from perfit.bench.tuning import collect, tuning_cells

    cells = select(grid(), ["table1/pathological/fit"])
    lines = []
    log = run_grid(cells, tmp_path, {"data": "d.jsonl"}, lambda c: {"personalized_ppl": math.nan, "wall_seconds": 1.0},
                   lines.append)  # fmt: skip
    assert [what for _, _, what in log] == ["ran", "ran"] and "n/a (diverged)" in lines[1]
    _fake_run(cells[0].run_dir(tmp_path, 0), None)  # NaN written as null, the way write_summary does
    _fake_run(cells[0].run_dir(tmp_path, 1), 9.0)
    _fake_run(tmp_path / "table1/pathological/perfit-s0.5/seed0", 8.0)  # one seed: no spread measured
    result = load_results(tmp_path)["table1/pathological/fit"]
    assert math.isnan(result.ppl[0]) and math.isnan(result.mean)
    write_report(tmp_path, tmp_path / "docs")  # tables, figures and results.json all take the NaN
    document = json.loads((tmp_path / "docs" / "results.json").read_text())["cells"]
    assert document["table1/pathological/fit"]["mean"] is None
    assert document["table1/pathological/perfit-s0.5"]["std"] is None
    assert "nan" in (tmp_path / "docs" / "results.md").read_text()
    lrs = (3e-4, 1e-2)
    for lr, run in zip(lrs, tuning_cells(cells, lrs), strict=True):
        _fake_run(run.run_dir(tmp_path / "tune", 0), None if lr == 1e-2 else 9.0, cell=run, evaluated_on="validation")
    assert collect(cells, tmp_path / "tune", lrs)["table1/pathological/fit"]["chosen_lr"] == 3e-4


def test_headline_ratios_and_seed_spread(tmp_path):
    values = {
        "table1/{s}/fit": (10.0, 10.2),
        "table1/{s}/perfit-s0.33": (9.0, 9.2),
        "table1/{s}/perfit-s0.5": (7.0, 7.4),  # the best sparsity
        "table1/{s}/perfit-s0.66": (8.9, 9.5),
        "table2/{s}/perfit-8-12-16": (6.0, 6.2),
        "baselines/{s}/local": (11.0, 11.0),
        "baselines/{s}/fedsa": (8.0, 8.4),  # the best baseline
    }
    for split in ("pathological", "dirichlet"):
        for name, seeds in values.items():
            for seed, ppl in enumerate(seeds):
                _fake_run(tmp_path / name.format(s=split) / f"seed{seed}", ppl)
    for seed, ppl in enumerate((9.0, 9.1)):  # FIT + FT run under the pathological split only
        _fake_run(tmp_path / "baselines/pathological/fit-ft" / f"seed{seed}", ppl)
    results = load_results(tmp_path)
    head = headline(results)
    for split in ("pathological", "dirichlet"):
        assert head["perfit_over_fit"][split] == pytest.approx(7.2 / 10.1)
        assert head["hetero_over_fit"][split] == pytest.approx(6.1 / 10.1)
    assert head["perfit_over_best_baseline"]["pathological"] == pytest.approx(7.2 / 8.2)
    assert math.isnan(head["perfit_over_best_baseline"]["dirichlet"])  # FIT + FT not run: no strongest yet
    fit, best = results["table1/pathological/fit"], results["table1/pathological/perfit-s0.5"]
    assert fit.std == pytest.approx(0.1414213, rel=1e-5)
    assert exceeds_spread(fit, best)  # 2.9 apart, spreads 0.14 + 0.28
    assert not exceeds_spread(results["table1/pathological/perfit-s0.33"], results["table1/pathological/perfit-s0.66"])
    # seeds far apart, the gap between methods steady
    steady_a = CellResult(fit.cell, {s: {"summary": {"personalized_ppl": p}} for s, p in enumerate((10.0, 14.0))})
    steady_b = CellResult(fit.cell, {s: {"summary": {"personalized_ppl": p}} for s, p in enumerate((9.8, 13.7))})
    assert abs(steady_a.mean - steady_b.mean) < steady_a.std + steady_b.std  # unpaired, this is noise
    assert exceeds_spread(steady_a, steady_b) and not exceeds_spread(steady_b, steady_b)
    assert paired_changes(steady_a, steady_b) == pytest.approx([10.0 / 9.8 - 1, 14.0 / 13.7 - 1])
    written = write_report(tmp_path, tmp_path / "docs")
    document = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert document["headline"]["perfit_over_fit"]["dirichlet"] == pytest.approx(7.2 / 10.1)
    assert document["cells"]["table1/dirichlet/perfit-s0.5"]["personalized_ppl"] == {"0": 7.0, "1": 7.4}
    assert document["cells"]["baselines/dirichlet/fit-ft"]["seeds"] == []
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "7.200 ± 0.283 (-28.7 % *)" in text and "not run yet" in text
    assert "lr 0.0003," in text and document["cells"]["table1/dirichlet/fit"]["config"]["lr"] == [3e-4]
    assert document["cells"]["table1/dirichlet/fit"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert (tmp_path / "docs" / "figures" / "loss_curves.png") in written
    assert "validation slice" not in text  # no tuning.json yet
    fit_tuning = {"validation_ppl": {"0.0003": 9.5, "0.001": 9.1}, "chosen_lr": 1e-3}
    tuning = {"command": "perfit bench tune", "lrs": [3e-4, 1e-3], "cells": {"table1/pathological/fit": fit_tuning}}
    (tmp_path / "docs" / "tuning.json").write_text(json.dumps(tuning))
    write_report(tmp_path, tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert (
        "## Learning rate on a validation slice" in text
        and "| table1/pathological/fit | 9.500 | **9.100** | 0.001 |" in text
    )


def test_headline_compares_only_the_seeds_both_cells_finished(tmp_path):
    for name, seeds in {
        "table1/pathological/fit": (10.0, 14.0),
        "table1/pathological/perfit-s0.5": (9.0,),  # seed 1 not run yet
        "table2/pathological/perfit-8-12-16": (11.0,),
        "baselines/pathological/local": (9.5, 13.0),
        "baselines/pathological/fedsa": (12.0,),
        "table1/pathological/perfit-s0.5-zero-b": (9.4, 12.0),
    }.items():
        for seed, ppl in enumerate(seeds):
            _fake_run(tmp_path / name / f"seed{seed}", ppl)
    head = headline(load_results(tmp_path))
    assert math.isnan(head["perfit_over_best_baseline"]["pathological"])  # FIT + FT not run: it could be the strongest
    _fake_run(tmp_path / "baselines/pathological/fit-ft/seed0", 20.0)
    head = headline(load_results(tmp_path))
    assert head["perfit_over_fit"]["pathological"] == pytest.approx(0.9)  # 9 / 10, not 9 / mean(10, 14)
    assert head["hetero_over_fit"]["pathological"] == pytest.approx(1.1)
    assert head["perfit_over_best_baseline"]["pathological"] == pytest.approx(9.0 / 9.5)  # local is the strongest
    # B = 0 against local over seeds 0 and 1 ((9.4 + 12) / (9.5 + 13)); against fedsa on seed 0 only (9.4 / 12)
    assert head["perfit_zero_b_over_best_baseline"]["pathological"] == pytest.approx(21.4 / 22.5)
    assert math.isnan(head["perfit_over_fit"]["dirichlet"])


def test_pearson_correlation_by_hand():
    from perfit.bench.figures import pearson

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)  # cov -0.5 / (1 * 1)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # no spread on one side


def test_single_seed_has_no_spread():
    result = CellResult(grid()[0], {0: {"summary": {"personalized_ppl": 5.0, "wall_seconds": 1.0}}})
    assert result.std == 0.0 and not result.complete and not exceeds_spread(result, result)


def test_one_real_cell_and_report_end_to_end(tiny_model, small_data, tmp_path):
    from perfit.cli import app

    runner = CliRunner()
    args = [
        "bench",
        "paper",
        "--out",
        str(tmp_path / "grid"),
        "--cells",
        "table1/pathological/fit",
        "--data",
        str(small_data),
        "--model",
        str(tiny_model),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "grid/table1/pathological/fit/seed1/summary.json").read_text())
    assert summary["evaluated_on"] == "held_out"
    again = runner.invoke(app, args)  # finished cells are skipped
    assert again.exit_code == 0 and "running" not in again.output
    report = runner.invoke(app, ["report", "--runs", str(tmp_path / "grid"), "--out", str(tmp_path / "docs")])
    assert report.exit_code == 0, report.output
    cell = json.loads((tmp_path / "docs/results.json").read_text())["cells"]["table1/pathological/fit"]
    assert cell["personalized_ppl"]["1"] == pytest.approx(summary["personalized_ppl"])
    bad = runner.invoke(app, ["bench", "paper", "--out", str(tmp_path / "g2"), "--rounds", "9"])
    assert bad.exit_code == 2 and "rounds" in bad.output
    assert runner.invoke(app, ["report", "--runs", str(tmp_path / "none")]).exit_code == 2


def test_the_grid_keeps_its_rate_while_the_quick_preset_uses_the_tuned_one():
    from perfit.bench.experiments import GRID_LR
    from perfit.config import make_config

    cell = select(grid(), ["table1/pathological/fit"])[0]
    assert make_config(None, "quick").lr == 3e-3 and GRID_LR == 3e-4
    assert cell.config(0, Path("runs"), data="d.jsonl").lr == GRID_LR  # every finished grid run used it
    assert cell.config(0, Path("runs"), data="d.jsonl", lr=1e-3).lr == 1e-3  # a --lr given to the grid
    assert dataclasses.replace(cell, fields={**cell.fields, "lr": 1e-2}).config(0, Path("runs"), lr=1e-3).lr == 1e-2


def test_the_report_compares_tuned_runs_with_tuned_fit_and_with_the_grid_rate(tmp_path):
    grid_dir, tuned_dir = tmp_path / "grid", tmp_path / "tuned"
    for seed, (fit, perfit) in enumerate(((10.0, 9.0), (12.0, 12.0))):
        _fake_run(grid_dir / "table1/pathological/fit" / f"seed{seed}", fit)
        _fake_run(grid_dir / "table1/pathological/perfit-s0.5" / f"seed{seed}", perfit)
    _fake_run(tuned_dir / "table1/pathological/fit/seed0", 8.0, lr=3e-3)
    _fake_run(tuned_dir / "table1/pathological/fit/seed1", 11.0, lr=3e-3)
    _fake_run(tuned_dir / "table1/pathological/perfit-s0.5/seed0", 9.0, lr=3e-3)  # seed 1 not run yet
    write_report(grid_dir, tmp_path / "docs", tuned_dir)
    tuned = json.loads((tmp_path / "docs" / "results.json").read_text())["tuned"]["cells"]
    assert tuned["table1/pathological/fit"]["over_grid_rate"] == pytest.approx(19.0 / 22.0)
    assert tuned["table1/pathological/perfit-s0.5"]["over_fit_tuned"] == pytest.approx(9.0 / 8.0)  # seed 0 only
    assert tuned["table1/pathological/perfit-s0.5"]["over_grid_rate"] == pytest.approx(1.0)
    assert tuned["table1/pathological/perfit-s0.5"]["lr"] == [3e-3]
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| table1/pathological/perfit-s0.5 | 0.003 | 9.000 | n/a | 1.1250x | 1.0000x |" in text
    from perfit.cli import app

    missing = CliRunner().invoke(app, ["report", "--runs", str(grid_dir), "--tuned-runs", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such directory" in missing.output


def test_a_paired_difference_is_named_only_where_every_seed_agrees_beyond_the_spread():
    from perfit.bench.personal import paired_claim

    assert paired_claim([-0.02, -0.03, -0.025]) == "lower"  # mean -0.025, sample std 0.005
    assert paired_claim([0.01, 0.01, 0.01]) == "higher"  # no spread at all
    # one sign, but mean 0.0207 < sample std 0.0257: the seeds do not pin it down
    assert paired_claim([0.01, 0.05, 0.002]) == "within the seed spread"
    assert paired_claim([-0.01, 0.02, -0.01]) == "within the seed spread"  # the seeds disagree
    assert paired_claim([-0.5]) == "within the seed spread"  # one seed has no spread to exceed
    assert paired_claim([0.01, math.nan, 0.01]) == "diverged or not read at a seed"


def test_against_fit_counts_the_clients_a_method_serves_better_than_fit_does():
    """A mean can hide the owners who lose: each client's perplexity over its own under FIT at the
    same seed, counted over the seeds; a diverged client (null) counts as not better."""
    from perfit.bench.personal import _against_fit

    cells = {c.name: c for c in GRIDS["personal"]()}

    def result(name: str, per_client: dict[str, float | None]) -> CellResult:
        summary = {"personalized_ppl": 15.0, "rouge_l": 0.3, "per_client_ppl": per_client}
        return CellResult(cells[name], {seed: {"summary": summary} for seed in (1, 2, 3)})

    fit = result("personal/pathological/fit", {"0": 10.0, "1": 20.0, "2": 30.0})
    method = result("personal/pathological/perfit", {"0": 9.0, "1": 21.0, "2": 27.0})  # 0.9x, 1.05x, 0.9x a seed
    against = _against_fit(method, fit)
    assert against["clients_better"] == 6 and against["client_seeds"] == 9
    assert against["client_ratio_range"] == pytest.approx([0.9, 1.05])
    diverged = _against_fit(result("personal/pathological/perfit", {"0": None, "1": 21.0, "2": 27.0}), fit)
    assert diverged["clients_better"] == 3 and diverged["client_seeds"] == 9
    assert diverged["client_ratio_range"] == pytest.approx([0.9, 1.05])
    assert _against_fit(fit, fit) is None  # FIT against itself says nothing


def test_the_personalization_report_checks_the_goal_seed_by_seed(tmp_path):
    """The variant is the one seed 0's validation chose; every ratio is paired by seed; a check that
    cannot be measured (no masks: r is NaN) fails rather than passes."""
    from perfit.bench.experiments import GRIDS, PERSONAL_VARIANTS, SPLITS
    from perfit.bench.personal import chosen_variants, load, summarize

    cells = {c.name: c for c in GRIDS["personal"]()}
    values = {  # seeds 1-3
        "fit": ((10.0, 12.0, 11.0), 0.30),
        "fit-ft": ((9.8, 11.6, 10.9), 0.29),  # the strongest baseline
        "local": ((11.0, 13.0, 12.0), 0.20),
        "fedsa": ((10.0, 12.0, 11.0), 0.28),
        "perfit-gradient-4": ((9.0, 10.8, 9.9), 0.31),
        "perfit": ((9.5, 12.5, 10.0), 0.30),
    }
    runs = tmp_path / "personal"
    for label, (ppls, rouge) in values.items():
        for seed, ppl in zip((1, 2, 3), ppls, strict=True):
            name = f"personal/pathological/{label}"
            _fake_run(runs / name / f"seed{seed}", ppl, cell=cells[name], rouge_l=rouge)

    def tuned(ppl: float) -> dict[str, Any]:
        return {"chosen_lr": 0.003, "validation_ppl": {"0.001": 1.0, "0.003": ppl}}  # read at its chosen rate

    ranked = ["perfit-gradient-4", *(v for v in PERSONAL_VARIANTS if v != "perfit-gradient-4")]
    tuning = {f"personal/{split}/fit": tuned(12.0 if split == "pathological" else 24.0) for split in SPLITS}
    for index, label in enumerate(ranked):
        tuning[f"personal/pathological/{label}"] = tuned(12.0 + index)
        tuning[f"personal/dirichlet/{label}"] = tuned(24.0 + index)
    assert chosen_variants(tuning) == dict.fromkeys(SPLITS, "perfit-gradient-4")
    for missing in ("personal/dirichlet/perfit-4", "personal/pathological/fit"):  # every one tuned, or no choice
        assert chosen_variants({k: v for k, v in tuning.items() if k != missing}) == dict.fromkeys(SPLITS)
    # one variant for both splits: the lowest geometric mean of its ratios to FIT, not each split's best
    # (there perfit-4 is best, 3 % ahead under Dirichlet, but 9 % behind under the pathological split)
    split_best = {**tuning, "personal/dirichlet/perfit-4": tuned(24.0 * 0.97)}
    split_best["personal/pathological/perfit-4"] = tuned(12.0 * 1.09)
    assert chosen_variants(split_best) == dict.fromkeys(SPLITS, "perfit-gradient-4")
    split_best["personal/pathological/perfit-4"] = tuned(12.0 * 1.02)  # 0.97 x 1.02 < 1 x 1
    assert chosen_variants(split_best) == dict.fromkeys(SPLITS, "perfit-4")
    # a geometric mean, not a sum of perplexities: FIT reads 24 under Dirichlet, 12 under the
    # pathological split, so perfit-4's 0.97 x 1.04 = 1.009 loses to 1 x 1, though its perplexities
    # sum lower (23.28 + 12.48 < 24 + 12): a sum would let the split with the larger perplexities decide
    split_best["personal/pathological/perfit-4"] = tuned(12.0 * 1.04)
    assert chosen_variants(split_best) == dict.fromkeys(SPLITS, "perfit-gradient-4")
    assert summarize(load(runs), {"cells": tuning})["search_readings"] == {}  # no tuning runs named: none read
    found = summarize(load(runs), {"cells": tuning})["splits"]
    path = found["pathological"]
    assert path["cells"]["perfit-gradient-4"]["over_fit"] == pytest.approx(29.7 / 33.0)
    assert path["cells"]["perfit-gradient-4"]["over_fit_per_seed"] == pytest.approx({"1": 0.9, "2": 0.9, "3": 0.9})
    assert path["over_best_baseline_per_seed"] == pytest.approx({"1": 9.0 / 9.8, "2": 10.8 / 11.6, "3": 9.9 / 10.9})
    assert path["checks"] == {
        "over_fit_every_seed": True,
        "over_best_baseline_every_seed": True,
        "rouge_l_not_below_fit": True,
        "masks_follow_data": False,  # no masks file: not measured, so not met
        "no_rejected_updates": True,
        "beyond_seed_spread": True,  # -10 % at every seed against FIT, -7 to -9 % against FIT + FT
    }
    assert path["goal_met"] is False
    # each cell with every seed, against FIT's same seeds: named only where the seeds agree beyond their spread
    against = {label: cell["against_fit"] for label, cell in path["cells"].items()}
    assert against["fit"] is None
    assert against["perfit-gradient-4"]["ppl"] == "lower" and against["perfit-gradient-4"]["rouge_l"] == "higher"
    assert against["local"]["ppl"] == "higher" and against["local"]["rouge_l"] == "lower"  # 1.08-1.10x
    assert against["perfit"]["ppl"] == "within the seed spread"  # 0.95x, 1.04x, 0.91x
    assert against["fedsa"]["ppl"] == "within the seed spread"  # FIT's perplexities: no change at all
    assert against["fit-ft"]["rouge_l_differences"] == pytest.approx([-0.01] * 3)
    assert (against["perfit-gradient-4"]["clients_better"], against["local"]["clients_better"]) == (3, 0)
    assert found["dirichlet"]["chosen_variant"] == "perfit-gradient-4" and found["dirichlet"]["goal_met"] is None
    # a variant that trails FIT at one seed fails the every-seed check however good its mean
    tuning["personal/pathological/perfit"]["validation_ppl"]["0.003"] = 1.0
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["chosen_variant"] == "perfit" and again["checks"]["over_fit_every_seed"] is False  # 12.5 > 12
    assert again["checks"]["beyond_seed_spread"] is False  # -5 %, +4 %, -9 % against FIT: no agreement
    _fake_run(tmp_path / "paper" / "table1/pathological/fit" / "seed0", 10.0)
    (tmp_path / "tuning.json").write_text(json.dumps({"cells": tuning}))
    write_report(tmp_path / "paper", tmp_path / "docs", personal_runs=runs, personal_tuning=tmp_path / "tuning.json")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| perfit (chosen on validation) | 1,2,3 | 10.667 | 0.9697 | 0.300 |" in text
    assert (
        "- `local`: perplexity 1.100x / 1.083x / 1.091x, **higher (worse)**; ROUGE-L -0.100 / -0.100 / -0.100, "
        "**lower (worse)**." in text
    )
    assert "](figures/personal_over_fit.png)" in text and (tmp_path / "docs/figures/personal_over_fit.png").is_file()
    from perfit.bench.figures import figure_over_fit_by_seed

    only_fit = {"pathological": {"cells": {"fit": {"over_fit_per_seed": {"1": 1.0}}}}}  # nothing to set against it
    assert not figure_over_fit_by_seed(only_fit, tmp_path / "docs/figures/personal_over_fit.png", 0.95)
    assert not (tmp_path / "docs/figures/personal_over_fit.png").exists()  # a stale figure goes
    assert (
        "**not met (over_fit_every_seed, over_best_baseline_every_seed, masks_follow_data, beyond_seed_spread)**"
        in text
    )
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["personal"]["splits"]["pathological"]
    from perfit.cli import app

    alone = tmp_path / "alone"  # no paper grid at hand: the section on its own
    args = ["report", "--runs", str(tmp_path / "nothing"), "--out", str(alone), "--personal-runs", str(runs)]
    result = CliRunner().invoke(app, [*args, "--personal-tuning", str(tmp_path / "tuning.json")])
    assert result.exit_code == 0, result.output
    assert "| perfit (chosen on validation) | 1,2,3 | 10.667 |" in (alone / "personalization.md").read_text()
    assert (alone / "figures" / "personal_over_fit.png").is_file()
    written = json.loads((alone / "personalization.json").read_text())
    assert written["splits"]["pathological"]["goal_met"] is False
    assert written["machine_hours"] == pytest.approx({"held_out": 6 * 3 * 10.0 / 3600, "tuning": 0.0})
    # where a report of the paper grid is there (the committed docs/), the section joins it in place
    docs = tmp_path / "docs"
    before = json.loads((docs / "results.json").read_text())
    (docs / "results.json").write_text(json.dumps({k: v for k, v in before.items() if k != "personal"}))
    stale = (docs / "results.md").read_text().replace("| perfit (chosen on validation) | 1,2,3 | 10.667 |", "| old |")
    (docs / "results.md").write_text(stale)
    args = ["report", "--runs", str(tmp_path / "nothing"), "--out", str(docs), "--personal-runs", str(runs)]
    result = CliRunner().invoke(app, [*args, "--personal-tuning", str(tmp_path / "tuning.json")])
    assert result.exit_code == 0, result.output
    merged = json.loads((docs / "results.json").read_text())
    assert (
        merged["headline"] == before["headline"] and merged["personal"]["splits"]["pathological"]["goal_met"] is False
    )
    text = (docs / "results.md").read_text()
    assert "| old |" not in text and text.count("| perfit (chosen on validation) | 1,2,3 | 10.667 |") == 1
    old, new = stale.split("\n"), text.split("\n")
    start = old.index(HEADING)
    after = next(i for i in range(start + 1, len(old)) if old[i].startswith("## "))  # the next section
    assert new[:start] == old[:start] and new[-(len(old) - after) :] == old[after:]  # the rest kept as it was
    assert not (docs / "personalization.md").exists()
    assert (docs / "figures/personal_over_fit.png").is_file()
    write_report(tmp_path / "paper", docs)  # the paper grid's report alone: no section, so no figure of it
    assert not (docs / "figures/personal_over_fit.png").exists()
    # a run that counted a round short of a client is named, and no claim rests on it
    fedsa = "personal/pathological/fedsa"
    timed_out = [{"client": 5, "reason": "no reply within 3600 s"}]
    _fake_run(runs / fedsa / "seed2", 12.0, cell=cells[fedsa], rouge_l=0.28, rejected_updates=timed_out)
    from perfit.bench.personal_report import section_markdown

    summary = summarize(load(runs), {"cells": tuning})
    path = summary["splits"]["pathological"]
    assert path["cells"]["fedsa"]["degraded_seeds"] == [2] and path["checks"]["no_rejected_updates"] is False
    assert "rerun them before a claim: fedsa (seeds [2])." in "\n".join(section_markdown(summary, runs))
    assert "Seeds [2] are to rerun before a claim (below)." in "\n".join(section_markdown(summary, runs))


def test_splice_replaces_the_personalization_section_or_puts_it_before_the_sections_after_it():
    from perfit.bench.personal_report import splice

    section = [HEADING, "", "new", ""]
    document = "# R\n\n## Ablations\n\na\n\n## Learning rate on a validation slice\n\nl\n\n## Every run\n\ne"
    inserted = splice(document, section)
    assert inserted == document.replace("## Learning rate", f"{HEADING}\n\nnew\n\n## Learning rate")
    assert splice(inserted, [HEADING, "", "newer", ""]) == inserted.replace("\nnew\n", "\nnewer\n")
    assert splice(inserted, section) == inserted  # idempotent
    assert splice("# R\n\n## Ablations\n", section) == "# R\n\n## Ablations\n\n" + "\n".join(section)
    at_end = splice(f"# R\n\n{HEADING}\n\nold\n### pathological\n\nold table", section)
    assert at_end == "# R\n\n" + "\n".join(section)  # its ### subsections go with it


def test_the_report_reads_every_perfit_cells_masks_on_its_chosen_tuning_run(tmp_path, monkeypatch):
    """The variant's diagnostics come from the runs it is chosen on: seed 0's tuning run at the
    cell's chosen rate, under the tuning's out; cells not yet tuned are left out."""
    import perfit.bench.diagnostics
    from perfit.bench.personal import search_readings

    seen = []

    def readings(directory):
        seen.append(Path(directory))
        return {"mean_pairwise_overlap": 0.6, "overlap_with_data_free_mask": 0.5, "mask_vs_data_similarity_r": 0.4,
                "mask_vs_data_similarity_p": 0.03, "kept_alone": 0.02}  # fmt: skip

    monkeypatch.setattr(perfit.bench.diagnostics, "mask_diagnostics", readings)
    cells = {
        "personal/dirichlet/perfit-4": {"chosen_lr": 0.01, "validation_ppl": {"0.001": 9.0, "0.01": 8.5}},
        "personal/dirichlet/fit": {"chosen_lr": 0.003, "validation_ppl": {"0.003": 8.0}},  # not PerFIT
        "personal/dirichlet/perfit": {"validation_ppl": {"0.001": 9.5}},  # not chosen yet
    }
    crossed = tmp_path / "personal/dirichlet/perfit-4/lr0.01/seed0"
    crossed.mkdir(parents=True)
    (crossed / "cross.json").write_text(json.dumps({"mean_own_over_others": 0.981}))  # `perfit bench cross`
    found = search_readings({"out": str(tmp_path), "cells": cells})
    from perfit.bench.personal import machine_hours

    for name, seconds in (("a/seed0", 1800.0), ("b/lr0.01/seed0", 5400.0)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"wall_seconds": seconds}))
    assert machine_hours(tmp_path) == pytest.approx(2.0) and machine_hours(tmp_path / "none") == 0.0
    assert seen == [tmp_path / "personal/dirichlet/perfit-4/lr0.01/seed0"]
    assert found == {
        "dirichlet": {
            "perfit-4": {
                "lr": 0.01,
                "validation_ppl": 8.5,
                "mask_pairwise_overlap": 0.6,
                "mask_data_free_overlap": 0.5,
                "mask_r": 0.4,
                "mask_r_p": 0.03,
                "mask_alone": 0.02,
                "own_over_others": 0.981,
                "transcribed": False,
            }
        }
    }
    from perfit.bench.personal_report import section_markdown

    summary = {"splits": {"dirichlet": {"cells": {}, "chosen_variant": None}}, "search_readings": found}
    text = "\n".join(section_markdown(summary, tmp_path))
    assert "| perfit-4 | 0.01 | 8.500 | 0.600 | 0.500 | 0.40 | 0.0300 | 0.020 | 0.9810 |" in text and "†" not in text
    cells["personal/dirichlet/perfit-4"]["transcribed"] = ["0.001", "0.01"]  # its run is gone: the value is copied
    found = search_readings({"out": str(tmp_path), "cells": cells})
    summary = {**summary, "search_readings": found, "transcribed_source": "the notebook"}
    text = "\n".join(section_markdown(summary, tmp_path))
    assert "| perfit-4 | 0.01 | 8.500† |" in text and "†: transcribed" in text and "(the notebook)" in text
    # its masks are its first rate's (the search reads no rate): read there, where that run is here
    seen.clear()

    def first_rate_only(directory):  # the chosen rate's run is gone; its first rate's, which searched, is here
        return readings(directory) if Path(directory).parent.name == "lr0.001" else seen.append(Path(directory))

    monkeypatch.setattr(perfit.bench.diagnostics, "mask_diagnostics", first_rate_only)
    found = search_readings({"out": str(tmp_path), "cells": cells, "lrs": [0.001, 0.003, 0.01]})
    assert seen == [crossed, tmp_path / "personal/dirichlet/perfit-4/lr0.001/seed0"]
    assert found["dirichlet"]["perfit-4"]["masks_read_on"] == "personal/dirichlet/perfit-4/lr0.001"
    text = "\n".join(section_markdown({**summary, "search_readings": found}, tmp_path))
    assert "| perfit-4 | 0.01 | 8.500† | 0.600‡ | 0.500‡ | 0.40‡ | 0.0300‡ | 0.020‡ | 0.9810 |" in text
    assert "‡: the masks read on the tuning run that searched them" in text
    found = search_readings({"out": str(tmp_path), "cells": cells, "lrs": [0.01, 0.003]})  # 0.01 searched: none
    assert "masks_read_on" not in found["dirichlet"]["perfit-4"] and math.isnan(
        found["dirichlet"]["perfit-4"]["mask_r"]
    )


def test_cross_evaluation_targets_the_papers_perfit_and_the_chosen_variant_once(tmp_path):
    from perfit.bench.experiments import PERSONAL_VARIANTS, SPLITS
    from perfit.bench.personal import cross_targets

    rates = {"perfit": 3e-3, "perfit-zero-b": 3e-3, "perfit-4": 1e-2, "perfit-gradient-4": 1e-3}

    def tuning_with(chosen: str) -> dict:
        """Every variant tuned in both splits, `chosen` lowest in both; FIT, not a PerFIT cell, lowest of all."""
        cells = {
            f"personal/{split}/{label}": {
                "chosen_lr": rates[label],
                "validation_ppl": {f"{rates[label]:g}": 9.0 if label == chosen else 10.0},
            }
            for split in SPLITS
            for label in PERSONAL_VARIANTS
        }
        for split in SPLITS:
            cells[f"personal/{split}/fit"] = {"chosen_lr": 3e-3, "validation_ppl": {"0.003": 8.0}}
        return {"out": str(tmp_path), "cells": cells}

    tuning = tuning_with("perfit-4")
    expected = [
        tmp_path / "personal/pathological/perfit/lr0.003/seed0",
        tmp_path / "personal/pathological/perfit-4/lr0.01/seed0",
        tmp_path / "personal/dirichlet/perfit/lr0.003/seed0",
        tmp_path / "personal/dirichlet/perfit-4/lr0.01/seed0",
    ]
    assert cross_targets(tuning) == []  # no run here yet: nothing to read
    for directory in expected:
        directory.mkdir(parents=True)
        (directory / "summary.json").write_text("{}")
    assert cross_targets(tuning) == expected
    assert cross_targets(tuning_with("perfit")) == expected[::2]  # the paper's PerFIT chosen: once a split
    (expected[1] / "cross.json").write_text("{}")  # already read: not again
    (expected[2] / ".restored").write_text("")  # a copy from a record: no adapters to read
    assert cross_targets(tuning) == [expected[0], expected[3]]


def _personal_runs(runs: Path, values: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]) -> None:
    """Fake held-out runs of the pathological split: label -> (perplexity, ROUGE-L) at seeds 1-3."""
    from perfit.bench.experiments import GRIDS

    cells = {c.name: c for c in GRIDS["personal"]()}
    for label, (ppls, rouges) in values.items():
        name = f"personal/pathological/{label}"
        for seed, ppl, rouge in zip((1, 2, 3), ppls, rouges, strict=True):
            _fake_run(runs / name / f"seed{seed}", ppl, cell=cells[name], rouge_l=rouge)


def test_the_goal_needs_every_held_out_seed_of_every_compared_cell_and_checks_each(tmp_path, monkeypatch):
    import perfit.bench.diagnostics
    from perfit.bench.experiments import PERSONAL_VARIANTS
    from perfit.bench.personal import load, summarize
    from perfit.bench.personal_report import section_markdown

    r_by_seed = {"seed1": 0.7, "seed2": 0.6, "seed3": 0.8}
    p_by_seed = {"seed1": 0.01, "seed2": 0.04, "seed3": 0.002}
    monkeypatch.setattr(
        perfit.bench.diagnostics, "mask_diagnostics",
        lambda d: {"mean_pairwise_overlap": 0.6, "overlap_with_data_free_mask": 0.5, "kept_alone": 0.1,
                   "mask_vs_data_similarity_r": r_by_seed[Path(d).name],
                   **({"mask_vs_data_similarity_p": p_by_seed[Path(d).name]} if Path(d).name in p_by_seed else {})},
    )  # fmt: skip
    runs = tmp_path / "personal"
    values = {
        "fit": ((10.0, 12.0, 11.0), (0.30, 0.30, 0.30)),
        "fit-ft": ((9.8, 11.6, 10.9), (0.29, 0.29, 0.29)),
        "local": ((11.0, 13.0, 12.0), (0.20, 0.20, 0.20)),
        "fedsa": ((9.7, 12.0, 11.0), (0.28, 0.28, 0.28)),  # the strongest baseline at seed 1 only
        "perfit-4": ((9.0, 10.8, 9.9), (0.31, 0.31, 0.31)),
    }
    _personal_runs(runs, values)
    tuning = {
        f"personal/{split}/{label}": {"chosen_lr": 0.003, "validation_ppl": {"0.003": 12.0 - (label == "perfit-4")}}
        for split in ("pathological", "dirichlet")
        for label in ("fit", *PERSONAL_VARIANTS)
    }
    summary = summarize(load(runs), {"cells": tuning})
    path = summary["splits"]["pathological"]
    assert path["over_best_baseline_per_seed"] == pytest.approx({"1": 9.0 / 9.7, "2": 10.8 / 11.6, "3": 9.9 / 10.9})
    assert path["goal_met"] is True and all(path["checks"].values())  # every seed, every check
    readings = path["cells"]["perfit-4"]
    assert readings["mask_r"] == pytest.approx(0.7) and readings["mask_r_p"] == 0.04  # r's mean, p's largest
    assert "| 0.600 | 0.500 | 0.70 | 0.0400 | 0.100 |" in "\n".join(section_markdown(summary, runs))
    del p_by_seed["seed2"]  # a run read before p was: the cell's p is unknown, not the others' largest
    unread = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]["cells"]["perfit-4"]
    assert math.isnan(unread["mask_r_p"])
    p_by_seed["seed2"] = 0.04
    assert summary["splits"]["dirichlet"]["missing_seeds"]["perfit-4"] == [1, 2, 3]
    assert summary["goal_met"] is None  # Dirichlet not measurable yet: no verdict over both splits
    assert "held-out runs missing (perfit-4 seeds [1, 2, 3]; fit seeds [1, 2, 3]; " in "\n".join(
        section_markdown(summary, runs)
    )

    r_by_seed["seed2"] = 0.4  # r below 0.5 at one seed, 0.63 on average
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["checks"]["masks_follow_data"] is False and again["goal_met"] is False
    r_by_seed["seed2"] = 0.6
    worse = dict(values, **{"perfit-4": ((9.0, 10.8, 9.9), (0.40, 0.40, 0.29))})  # ROUGE-L above FIT on average
    _personal_runs(runs, worse)
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["checks"]["rouge_l_not_below_fit"] is False  # but below it at seed 3
    _personal_runs(runs, values)
    (runs / "personal/pathological/fedsa/seed3/summary.json").unlink()  # a baseline short of a seed
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["goal_met"] is None and again["missing_seeds"] == {"fedsa": [3]}


def test_the_goal_over_both_splits_needs_one_method_meeting_it_in_each():
    from perfit.bench.personal import _both_splits

    def splits(*found):
        return {f"s{i}": {"chosen_variant": v, "goal_met": met} for i, (v, met) in enumerate(found)}

    assert _both_splits(splits(("perfit-4", True), ("perfit-4", True))) is True
    assert _both_splits(splits(("perfit-4", True), ("perfit", True))) is False  # two methods, not one
    assert _both_splits(splits(("perfit-4", True), ("perfit-4", None))) is None
    assert _both_splits(splits(("perfit-4", False), (None, None))) is False
    assert _both_splits(splits((None, None), (None, None))) is None


def test_the_quick_grids_mask_diagnostics_table_gives_r_and_its_p():
    """One row per PerFIT run with masks; a run read before r's p existed shows n/a, not a number."""
    from perfit.bench.report import _diagnostics_section

    reading = {"mean_pairwise_overlap": 0.68, "overlap_with_data_free_mask": 0.69, "mask_vs_data_similarity_r": 0.2}
    lines = _diagnostics_section({"table1/pathological/perfit": {"0": {**reading, "mask_vs_data_similarity_p": 0.0123},
                                                                  "1": reading}})  # fmt: skip
    text = "\n".join(lines)
    assert "r's p" in text and "| table1/pathological/perfit | 0 | 0.680 | 0.690 | 0.200 | 0.0123 |" in text
    assert "| table1/pathological/perfit | 1 | 0.680 | 0.690 | 0.200 | n/a |" in text
    assert _diagnostics_section({}) == []


def test_the_report_reads_the_base_model_on_fits_rows_at_the_seeds_that_have_it(tmp_path):
    """FIT over the base model (`perfit bench base`'s base.json in FIT's runs), per seed and over the
    seeds that have the reading, beside the other methods' ratios to FIT at those seeds only."""
    from perfit.bench.personal import base_model, load, summarize
    from perfit.bench.personal_report import _base_model_lines

    runs = tmp_path / "personal"
    values = {
        "fit": ((10.0, 12.0, 11.0), (0.3,) * 3),
        "fit-ft": ((9.8, 11.6, 10.9), (0.3,) * 3),  # 0.98x, 0.967x, 0.991x
        "perfit": ((10.5, 12.0, 12.1), (0.3,) * 3),  # 1.05x, 1.00x, 1.10x (seed 3: no base reading)
    }
    _personal_runs(runs, values)
    fit = runs / "personal/pathological/fit"
    assert base_model(load(runs)["personal/pathological/fit"]) is None  # no reading yet
    for seed, base in ((1, 12.5), (2, 16.0)):
        (fit / f"seed{seed}" / "base.json").write_text(json.dumps({"personalized_base_ppl": base}))
    found = base_model(load(runs)["personal/pathological/fit"])
    assert found["seeds"] == [1, 2] and found["personalized_ppl"] == pytest.approx(14.25)
    assert found["fit_over_base_per_seed"] == pytest.approx({"1": 0.8, "2": 0.75})
    assert found["fit_over_base"] == pytest.approx(11.0 / 14.25)  # means over the seeds, then their ratio
    split = summarize(load(runs))["splits"]["pathological"]
    assert split["base_model"] == found and summarize(load(runs))["splits"]["dirichlet"]["base_model"] is None
    assert _base_model_lines(split) == [
        "Training itself: FIT's personalized perplexity is 0.800x / 0.750x the base model's with no adapter at "
        "seeds 1/2 (base 14.250; `perfit bench base`), 23% lower; at the same seeds every other method is "
        "0.967x to 1.050x FIT's.",
        "",
    ]
    one_seed = {
        **split,
        "cells": {label: {**cell, "over_fit_per_seed": {"1": 1.05}} for label, cell in split["cells"].items()},
    }
    assert _base_model_lines(one_seed)[0].endswith("every other method is 1.050x FIT's.")  # not "1.050x to 1.050x"
    worse = {**split, "base_model": {**found, "fit_over_base": 1.05, "fit_over_base_per_seed": {"1": 1.05}}}
    assert (
        "1.050x the base model's with no adapter at seed 1 (base 14.250; `perfit bench base`), 5% higher"
        in (_base_model_lines(worse)[0])
    )  # training that made it worse says so, not "-5% lower"
    (fit / "seed2" / "base.json").write_text(json.dumps({"personalized_base_ppl": None}))  # no client scored
    assert base_model(load(runs)["personal/pathological/fit"])["seeds"] == [1]
