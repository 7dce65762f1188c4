"""The resumable paper grid (`perfit bench paper`): cell selection and order, skip / resume / restart
of runs, what a grid counts as finished, and one real cell end to end on the tiny Llama."""

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perfit.bench.experiments import GRIDS, grid, run_grid, schedule, select, state
from perfit.bench.report import write_report
from perfit.bench.results import load_results

from .fake_runs import fake_run


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


def test_run_grid_skips_finished_resumes_partial_and_restarts_dead(tmp_path):
    cells = select(grid(), ["table1/pathological/fit"])
    cell = cells[0]
    fake_run(cell.run_dir(tmp_path, 0), 10.0)
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
    fake_run(fit.run_dir(tmp_path, 1), 10.0, wall=600.0, cell=fit)
    fake_run(fit.run_dir(tmp_path, 2), 10.0, wall=800.0, cell=fit)
    fake_run(fit_ft.run_dir(tmp_path, 1), 9.0, wall=50.0, cell=fit_ft)
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
        fake_run(Path(config.out), 9.0, cell=next(c for c in cells if Path(config.out).parent.name == c.label))
        return {"personalized_ppl": 9.0, "wall_seconds": 1.0}

    # seed 3's FIT run finished under another config (another rate): reported, not started from
    fake_run(cells[0].run_dir(tmp_path, 3), 9.0, cell=cells[0], lr=1e-2)
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
    fake_run(cell.run_dir(tmp_path, 0), 10.0)
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
    fake_run(cell.run_dir(tmp_path, 0), 10.0, lr=3e-4)
    fake_run(cell.run_dir(tmp_path, 1), 11.0, lr=3e-3)
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
    fake_run(cells[0].run_dir(tmp_path, 0), None)  # NaN written as null, the way write_summary does
    fake_run(cells[0].run_dir(tmp_path, 1), 9.0)
    fake_run(tmp_path / "table1/pathological/perfit-s0.5/seed0", 8.0)  # one seed: no spread measured
    result = load_results(tmp_path)["table1/pathological/fit"]
    assert math.isnan(result.ppl[0]) and math.isnan(result.mean)
    write_report(tmp_path, tmp_path / "docs")  # tables, figures and results.json all take the NaN
    document = json.loads((tmp_path / "docs" / "results.json").read_text())["cells"]
    assert document["table1/pathological/fit"]["mean"] is None
    assert document["table1/pathological/perfit-s0.5"]["std"] is None
    assert "nan" in (tmp_path / "docs" / "results.md").read_text()
    lrs = (3e-4, 1e-2)
    for lr, run in zip(lrs, tuning_cells(cells, lrs), strict=True):
        fake_run(run.run_dir(tmp_path / "tune", 0), None if lr == 1e-2 else 9.0, cell=run, evaluated_on="validation")
    assert collect(cells, tmp_path / "tune", lrs)["table1/pathological/fit"]["chosen_lr"] == 3e-4


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
