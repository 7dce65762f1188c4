"""`perfit bench tune`: candidate runs, the choice rule, the tuning.json round trip into the grid,
and the CLI on a fake runner (the federation itself is tested elsewhere)."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perfit.bench.experiments import grid, select
from perfit.bench.tuning import beyond, candidates, choose, collect, edge, tuned, tuning_cells, tuning_markdown


def test_choose_lowest_finite_and_ties_to_the_smaller_rate():
    assert choose({3e-4: 15.2, 1e-3: 14.9, 3e-3: 16.0}) == 1e-3
    assert choose({3e-3: 14.0, 1e-3: 14.0}) == 1e-3
    assert choose({3e-4: 15.0, 1e-3: math.nan, 3e-3: math.inf}) == 3e-4  # a diverged run never wins
    with pytest.raises(ValueError, match="finite"):
        choose({1e-3: math.nan})


def test_edge_flags_a_choice_at_either_end_of_the_candidates():
    assert edge(3e-3, (3e-4, 1e-3, 3e-3)) == "largest"
    assert edge(3e-4, (3e-4, 1e-3, 3e-3)) == "smallest"
    assert edge(1e-3, (3e-4, 1e-3, 3e-3)) is None
    assert edge(1e-3, (1e-3,)) is None


def test_beyond_steps_half_a_decade_on_the_1_3_10_ladder():
    assert [beyond(lr, "smallest") for lr in (1e-3, 3e-4, 1e-4, 5e-4, 2e-4)] == [3e-4, 1e-4, 3e-5, 3e-4, 1e-4]
    assert [beyond(lr, "largest") for lr in (1e-2, 3e-2, 3e-3, 5e-4, 2e-3)] == [3e-2, 1e-1, 1e-2, 1e-3, 1e-2]
    assert (beyond(3.2e-4, "smallest"), beyond(9e-4, "largest")) == (1e-4, 3e-3)  # a step is at least 1.5x


def test_candidates_widen_past_the_end_the_choice_sits_at_until_it_is_inside():
    lrs = (1e-3, 3e-3, 1e-2)
    assert candidates({}, lrs, widen=2) == lrs  # nothing finished: nothing to widen
    assert candidates({1e-3: 10.2, 3e-3: 10.0}, lrs, widen=2) == lrs  # 1e-2 still running
    assert candidates({1e-3: 10.2, 3e-3: 10.0, 1e-2: 10.8}, lrs, widen=2) == lrs  # inside
    at_smallest = {1e-3: 10.0, 3e-3: 10.5, 1e-2: 13.0}
    assert candidates(at_smallest, lrs, widen=0) == lrs
    assert candidates(at_smallest, lrs, widen=2) == (3e-4, *lrs)
    assert candidates({**at_smallest, 3e-4: 10.1}, lrs, widen=2) == (3e-4, *lrs)  # 1e-3 is now inside
    assert candidates({**at_smallest, 3e-4: 9.9}, lrs, widen=2) == (1e-4, 3e-4, *lrs)
    assert candidates({**at_smallest, 3e-4: 9.9, 1e-4: 9.8}, lrs, widen=2) == (1e-4, 3e-4, *lrs)  # at most 2
    assert candidates({1e-3: 10.4, 3e-3: 10.2, 1e-2: 10.1}, lrs, widen=1) == (*lrs, 3e-2)
    assert candidates({1e-3: math.nan, 3e-3: math.nan, 1e-2: math.nan}, lrs, widen=2) == lrs  # all diverged


def test_collect_chooses_among_the_widened_candidates_once_they_finished(tmp_path):
    cells = select(grid(), ["table1/pathological/fit"])
    _summary(tmp_path / "table1/pathological/fit/lr0.001/seed0", 10.0)
    _summary(tmp_path / "table1/pathological/fit/lr0.003/seed0", 10.5, kept_lost=[{"client": 2, "round": 3}])
    entry = collect(cells, tmp_path, (1e-3, 3e-3), widen=2)["table1/pathological/fit"]
    assert entry["lrs"] == [3e-4, 1e-3, 3e-3] and "chosen_lr" not in entry  # 3e-4 not run yet
    runs = tuning_cells(cells, (1e-3, 3e-3), widened={"table1/pathological/fit": tuple(entry["lrs"])})
    assert [r.name.rsplit("/", 1)[1] for r in runs] == ["lr0.001", "lr0.003", "lr0.0003"]  # the given order first
    _summary(tmp_path / "table1/pathological/fit/lr0.0003/seed0", 9.0)
    _summary(tmp_path / "table1/pathological/fit/lr0.0001/seed0", 9.5, rejected=[{"client": 5, "reason": "timeout"}])
    entry = collect(cells, tmp_path, (1e-3, 3e-3), widen=2)["table1/pathological/fit"]
    assert (entry["chosen_lr"], entry["edge"], entry["lrs"]) == (3e-4, None, [1e-4, 3e-4, 1e-3, 3e-3])
    assert collect(cells, tmp_path, (1e-3, 3e-3))["table1/pathological/fit"]["chosen_lr"] == 1e-3  # widen 0
    text = tuning_markdown({"table1/pathological/fit": entry}, (1e-3, 3e-3), "perfit bench tune")
    assert "| table1/pathological/fit | 9.500 | **9.000** | 10.000 | 10.500 | 0.0003 |" in text
    assert entry["rejected_updates"] == [1e-4, 3e-3]  # a client's update rejected, a node's kept values restarted
    assert "restarted a node's kept values: table1/pathological/fit (lr 0.0001, 0.003)." in text


def test_tuning_cells_run_each_candidate_in_validation_mode_at_seed_0():
    cells = select(grid(), ["table1/pathological/fit", "baselines/dirichlet/fedsa"])
    runs = tuning_cells(cells, (3e-4, 1e-3))
    assert [r.name for r in runs] == [
        "table1/pathological/fit/lr0.0003",
        "table1/pathological/fit/lr0.001",
        "baselines/dirichlet/fedsa/lr0.0003",
        "baselines/dirichlet/fedsa/lr0.001",
    ]
    assert all(r.seeds == (0,) and r.fields["validation"] == 1 for r in runs)
    config = runs[1].config(0, Path("t"), data="d.jsonl")
    assert (config.lr, config.validation, config.method, config.split) == (1e-3, 1, "fit", "pathological")


def _summary(path, ppl, evaluated_on="validation", rejected=(), kept_lost=()):
    path.mkdir(parents=True)
    summary = {"personalized_ppl": ppl, "evaluated_on": evaluated_on, "rejected_updates": list(rejected)}
    summary["kept_lost"] = list(kept_lost)
    (path / "summary.json").write_text(json.dumps(summary))


def test_collect_chooses_only_when_every_candidate_finished_and_refuses_test_runs(tmp_path):
    cells = select(grid(), ["table1/pathological/fit", "table1/pathological/perfit-s0.5"])
    _summary(tmp_path / "table1/pathological/fit/lr0.0003/seed0", 15.0)
    _summary(tmp_path / "table1/pathological/fit/lr0.001/seed0", 14.2)
    _summary(tmp_path / "table1/pathological/perfit-s0.5/lr0.0003/seed0", 15.5)
    table = collect(cells, tmp_path, (3e-4, 1e-3))
    assert table["table1/pathological/fit"] == {
        "lrs": [3e-4, 1e-3],
        "validation_ppl": {"0.0003": 15.0, "0.001": 14.2},
        "rejected_updates": [],
        "chosen_lr": 1e-3,
        "edge": "largest",
    }
    assert "chosen_lr" not in table["table1/pathological/perfit-s0.5"]  # lr 1e-3 not run yet
    text = tuning_markdown(table, (3e-4, 1e-3), "perfit bench tune")
    assert "| table1/pathological/fit | 15.000 | **14.200** | 0.001 |" in text
    assert "| table1/pathological/perfit-s0.5 | 15.500 | – | pending |" in text
    assert "may lie beyond it (widen `--lrs` or `--widen`): table1/pathological/fit (largest)." in text
    _summary(tmp_path / "table1/pathological/perfit-s0.5/lr0.001/seed0", 9.0, evaluated_on="held_out")
    with pytest.raises(ValueError, match="not a validation run"):
        collect(cells, tmp_path, (3e-4, 1e-3))


def test_tuned_applies_the_chosen_rates_and_refuses_missing_cells(tmp_path):
    cells = select(grid(), ["table1/pathological/fit", "table1/pathological/perfit-s0.5"])
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"cells": {"table1/pathological/fit": {"chosen_lr": 1e-3}}}))
    with pytest.raises(ValueError, match="perfit-s0.5"):
        tuned(cells, path)
    both = {c.name: {"chosen_lr": lr} for c, lr in zip(cells, (1e-3, 3e-3), strict=True)}
    path.write_text(json.dumps({"cells": both}))
    assert [c.fields["lr"] for c in tuned(cells, path)] == [1e-3, 3e-3]
    assert [c.fields.get("lr") for c in cells] == [None, None]  # the grid itself is untouched
    path.write_text("{")
    with pytest.raises(ValueError, match="not a tuning.json"):
        tuned(cells, path)


def test_bench_tune_cli_writes_docs_and_feeds_bench_paper(tmp_path, monkeypatch):
    import perfit.cli.base as cli

    ran = []

    def fake_run(config):  # validation perplexity falls with the rate for FIT, rises for PerFIT
        assert config.validation == 1 and config.seed == 0
        ppl = 20 - 1000 * config.lr if config.method == "fit" else 10 + 1000 * config.lr
        _summary(Path(config.out), ppl)
        ran.append((config.method, config.lr))
        return {"personalized_ppl": ppl, "wall_seconds": 1.0}

    monkeypatch.setattr(cli, "run_federation", fake_run)
    runner = CliRunner()
    head = ["bench", "tune", "--out", str(tmp_path / "tune"), "--docs", str(tmp_path / "docs"), "--lrs"]
    cells = ["--cells", "table1/pathological/fit", "--cells", "table1/pathological/perfit-s0.5", "--data", "d.jsonl"]
    args = [*head, "1e-4,1e-3", *cells]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert sorted(ran) == [("fit", 1e-4), ("fit", 1e-3), ("perfit", 1e-4), ("perfit", 1e-3)]
    written = json.loads((tmp_path / "docs/tuning.json").read_text())
    assert written["cells"]["table1/pathological/fit"]["chosen_lr"] == 1e-3
    assert written["cells"]["table1/pathological/perfit-s0.5"]["chosen_lr"] == 1e-4
    assert "--lrs 1e-4,1e-3" in written["command"]
    assert runner.invoke(cli.app, args).exit_code == 0 and len(ran) == 4  # finished runs are skipped
    listing = runner.invoke(
        cli.app,
        ["bench", "paper", "--tuned", str(tmp_path / "docs/tuning.json"), "--cells", "table1/pathological/fit",
         "--out", str(tmp_path / "grid"), "--list"],
    )  # fmt: skip
    assert listing.exit_code == 0 and "0.001" in listing.output
    assert "0 of 2 runs finished, 0.0 h of wall time; none finished to estimate the rest from" in listing.output
    missing = runner.invoke(
        cli.app, ["bench", "paper", "--tuned", str(tmp_path / "docs/tuning.json"), "--cells", "table2/*", "--list"]
    )
    assert missing.exit_code == 2 and "no tuned learning rate" in missing.output
    bad = runner.invoke(cli.app, [*head, "1e-3,fast", *cells])
    assert bad.exit_code == 2 and "--lrs" in bad.output


def test_bench_tune_widens_a_choice_at_the_edge_in_the_same_command(tmp_path, monkeypatch):
    import perfit.cli.base as cli

    ran = []

    def fake_run(config):  # the validation perplexity falls all the way to 3e-2
        ppl = 20 - 100 * min(config.lr, 3e-2)
        _summary(Path(config.out), ppl)
        ran.append(config.lr)
        return {"personalized_ppl": ppl, "wall_seconds": 1.0}

    monkeypatch.setattr(cli, "run_federation", fake_run)
    args = ["bench", "tune", "--out", str(tmp_path / "tune"), "--docs", str(tmp_path / "docs"), "--lrs", "1e-3,3e-3",
            "--cells", "table1/pathological/fit", "--data", "d.jsonl", "--widen"]  # fmt: skip
    result = CliRunner().invoke(cli.app, [*args, "2"])
    assert result.exit_code == 0, result.output
    assert ran == [1e-3, 3e-3, 1e-2, 3e-2]
    written = json.loads((tmp_path / "docs/tuning.json").read_text())
    entry = written["cells"]["table1/pathological/fit"]
    assert (entry["chosen_lr"], entry["edge"], written["widen"]) == (3e-2, "largest", 2)  # still at the end: said
    assert "--widen 2" in written["command"]
    assert CliRunner().invoke(cli.app, [*args, "3"]).exit_code == 0 and ran[4:] == [1e-1]  # one more step
    assert json.loads((tmp_path / "docs/tuning.json").read_text())["cells"]["table1/pathological/fit"]["edge"] is None


def test_bench_tune_names_a_failed_run_exits_1_and_keeps_the_others(tmp_path, monkeypatch):
    import perfit.cli.base as cli

    def fake_run(config):
        if config.lr == 1e-3:
            raise RuntimeError("client 3 ran out of memory")
        _summary(Path(config.out), 15.0)
        return {"personalized_ppl": 15.0, "wall_seconds": 1.0}

    monkeypatch.setattr(cli, "run_federation", fake_run)
    args = ["bench", "tune", "--out", str(tmp_path / "tune"), "--docs", str(tmp_path / "docs"), "--lrs", "3e-4,1e-3",
            "--cells", "table1/pathological/fit", "--data", "d.jsonl"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1 and "out of memory" in result.output and "1 run(s) failed" in result.output
    assert (tmp_path / "tune/table1/pathological/fit/lr0.0003/seed0/summary.json").is_file()


def test_fit_ft_is_tuned_from_fits_tuning_run_at_fits_chosen_rate():
    """FIT + local fine-tuning starts from FIT's run: in tuning, from FIT's tuning run at the rate FIT's
    tuning chose; its own candidates are rates of the fine-tuning. Before FIT has chosen it waits."""
    from perfit.bench.experiments import GRIDS

    cells = select(GRIDS["personal"](), ["personal/dirichlet/fit-ft"])
    assert tuning_cells(cells, (1e-3, 3e-3)) == []
    runs = tuning_cells(cells, (1e-3, 3e-3), {"personal/dirichlet/fit": 3e-3})
    assert [r.name for r in runs] == ["personal/dirichlet/fit-ft/lr0.001", "personal/dirichlet/fit-ft/lr0.003"]
    config = runs[0].config(0, Path("t"), data="d.jsonl")
    assert config.start_from == str(Path("t/personal/dirichlet/fit/lr0.003/seed0").resolve())
    assert (config.lr, config.rounds, config.finetune_epochs, config.validation) == (1e-3, 0, 1, 1)


def test_one_bench_tune_runs_fit_ft_after_fits_tuning_chose_its_rate(tmp_path, monkeypatch):
    import perfit.cli.base as cli

    ran = []

    def fake_run(config):  # FIT's validation perplexity falls with the rate: it chooses 3e-3
        _summary(Path(config.out), 20 - 1000 * config.lr)
        ran.append((Path(config.out).parent.parent.name, config.lr, config.rounds, config.start_from))
        return {"personalized_ppl": 20 - 1000 * config.lr, "wall_seconds": 1.0}

    monkeypatch.setattr(cli, "run_federation", fake_run)
    out = tmp_path / "tune"
    args = ["bench", "tune", "--grid", "personal", "--out", str(out), "--docs", str(tmp_path / "docs"), "--lrs"]
    cells = ["--cells", "personal/dirichlet/fit-ft", "--cells", "personal/dirichlet/fit", "--data", "d.jsonl"]
    result = CliRunner().invoke(cli.app, [*args, "1e-3,3e-3", *cells])
    assert result.exit_code == 0, result.output
    fit_run = str((out / "personal/dirichlet/fit/lr0.003/seed0").resolve())
    assert ran == [
        ("fit", 1e-3, 10, ""),
        ("fit", 3e-3, 10, ""),
        ("fit-ft", 1e-3, 0, fit_run),
        ("fit-ft", 3e-3, 0, fit_run),
    ]
    written = json.loads((tmp_path / "docs/tuning.json").read_text())
    assert written["out"] == str(out.resolve()) and written["cells"]["personal/dirichlet/fit-ft"]["chosen_lr"] == 3e-3


def test_a_perfit_cell_searches_once_for_all_its_rates():
    """The search reads no rate: a PerFIT cell's later candidates keep its first candidate's masks;
    PerFIT trained from B = 0 (the paper's search) keeps the paper's PerFIT's; FIT has none."""
    from perfit.bench.experiments import GRIDS

    cells = select(GRIDS["personal"](), ["personal/pathological/perfit", "personal/pathological/perfit-zero-b",
                                          "personal/pathological/perfit-4", "personal/pathological/fit"])  # fmt: skip
    runs = {r.name: r.config(0, Path("t"), data="d.jsonl").masks_from for r in tuning_cells(cells, (1e-3, 3e-3))}
    first = str(Path("t/personal/pathological/perfit/lr0.001/seed0").resolve())
    assert runs == {
        "personal/pathological/fit/lr0.001": "",
        "personal/pathological/fit/lr0.003": "",
        "personal/pathological/perfit/lr0.001": "",
        "personal/pathological/perfit/lr0.003": first,
        "personal/pathological/perfit-zero-b/lr0.001": first,
        "personal/pathological/perfit-zero-b/lr0.003": first,
        "personal/pathological/perfit-4/lr0.001": "",
        "personal/pathological/perfit-4/lr0.003": str(Path("t/personal/pathological/perfit-4/lr0.001/seed0").resolve()),
    }
    perfit = [c for c in cells if c.name == "personal/pathological/perfit"]
    widened = tuning_cells(perfit, (1e-3, 3e-3), widened={perfit[0].name: (3e-4, 1e-3, 3e-3)})
    assert widened[-1].name.endswith("lr0.0003") and widened[-1].config(0, Path("t"), data="d").masks_from == first
    held_out = select(GRIDS["personal"](), ["personal/dirichlet/perfit-zero-b"])[0].config(2, Path("g"), data="d")
    assert held_out.masks_from == str(Path("g/personal/dirichlet/perfit/seed2").resolve())


def test_the_listing_gives_the_hours_to_go_in_wall_time_over_the_lanes(monkeypatch, capsys):
    """`--list`: the hours to go are lane time (each run's own wall time); with --lanes 2 about half
    of it is the wall time, since two runs go at once."""
    import perfit.bench.experiments
    from perfit.cli import grid as grid_commands

    monkeypatch.setattr(perfit.bench.experiments, "progress", lambda cells, out: (1, 3, 3600.0, 36000.0))
    grid_commands._list_cells([], Path("unused"), lanes=1)
    alone = capsys.readouterr().out
    assert "1 of 3 runs finished, 1.0 h of wall time; about 10.0 h to go" in alone and "lanes" not in alone
    grid_commands._list_cells([], Path("unused"), lanes=2)
    assert "about 10.0 h to go (about 5.0 h of wall time in 2 lanes)" in capsys.readouterr().out
