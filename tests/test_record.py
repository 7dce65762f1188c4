"""The grid's record (`bench.record`) and transcribed tuning values (`bench.tuning`): what a grid
keeps of its finished runs where they outlive the machine, what it puts back, and what it runs again
because a run still to go needs files the record does not keep."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perfit.bench.experiments import Cell, personalization_grid, schedule, select
from perfit.bench.record import KEPT, RESTORED, is_copy, keep, keep_all, restore
from perfit.bench.tuning import collect, read_transcribed, still_to_run, tuning_cells, tuning_markdown


def _finished(directory: Path, ppl: float = 10.0, big: bool = True) -> Path:
    """A finished run's files: the small ones, and where `big` a checkpoint and an adapter."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text("seed = 0\n")
    summary = {"personalized_ppl": ppl, "evaluated_on": "validation", "wall_seconds": 60.0}
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "metrics.jsonl").write_text('{"round": 1}\n')
    if big:
        (directory / "checkpoint.safetensors").write_bytes(b"\0" * 64)
        (directory / "adapters" / "global").mkdir(parents=True)
        (directory / "adapters" / "global" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return directory


def test_keep_copies_a_finished_runs_small_files_only(tmp_path):
    out, record = tmp_path / "runs", tmp_path / "record"
    run = _finished(out / "g/s/fit/seed0")
    (run / "cross.json").write_text("{}")
    assert keep(run, out, record)
    kept = record / "g/s/fit/seed0"
    assert sorted(p.name for p in kept.iterdir()) == ["config.toml", "cross.json", "metrics.jsonl", "summary.json"]
    assert not is_copy(kept) and not is_copy(run)  # a copy is what `restore` puts back
    unfinished = out / "g/s/fedsa/seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "checkpoint.safetensors").write_bytes(b"\0")
    assert not keep(unfinished, out, record) and not (record / "g/s/fedsa").exists()
    assert keep_all(out, record) == 1
    with pytest.raises(ValueError, match="not a run under"):
        keep(_finished(tmp_path / "elsewhere"), out, record)
    (run / "partitions.json").write_text("{}")  # what a run it builds on is checked against
    hidden = _finished(out / "g/s/.seed1.restoring.7")  # a copy another process is putting back
    assert keep_all(out, record) == 1 and (record / "g/s/fit/seed0/partitions.json").is_file()
    assert not (record / "g/s" / hidden.name).exists() and "partitions.json" in KEPT
    assert not [p for p in kept.iterdir() if p.name.startswith(".")]  # each file renamed into place


def _chain() -> list[Cell]:
    """FIT; FIT + FT starting from FIT's run; a third cell starting from FIT + FT's (a chain of two)."""
    fit = Cell("g/s/fit", "g", "s", "fit", {"method": "fit"}, seeds=(1,))
    ft = Cell("g/s/fit-ft", "g", "s", "fit-ft", {"method": "fit"}, seeds=(1,), start="g/s/fit")
    more = Cell("g/s/more", "g", "s", "more", {"method": "fit"}, seeds=(1,), start="g/s/fit-ft")
    return [fit, ft, more]


def test_restore_puts_back_recorded_runs_but_runs_again_a_source_a_run_to_go_needs(tmp_path):
    out, record = tmp_path / "runs", tmp_path / "record"
    fit, ft, more = _chain()
    for cell in (fit, ft, more):
        _finished(record / cell.name / "seed1", big=False)
    restored, again = restore(schedule([fit, ft, more]), out, record)
    assert restored == [c.run_dir(out, 1) for c in (fit, ft, more)] and again == []
    assert (ft.run_dir(out, 1) / "summary.json").is_file() and is_copy(ft.run_dir(out, 1))

    # the last run is not recorded: FIT + FT runs again for its adapter, and FIT for FIT + FT's
    out2 = tmp_path / "runs2"
    (record / more.name).rename(tmp_path / "aside")
    restored, again = restore(schedule([fit, ft, more]), out2, record)
    assert restored == [] and again == [fit.run_dir(out2, 1), ft.run_dir(out2, 1)]
    assert not fit.run_dir(out2, 1).exists()

    # a copy put back earlier is removed once a run to go needs it; a real run is never touched
    restored, again = restore(schedule([fit, ft, more]), out, record)
    assert again == [fit.run_dir(out, 1), ft.run_dir(out, 1)] and not fit.run_dir(out, 1).exists()
    _finished(fit.run_dir(out, 1), ppl=9.0)
    restored, again = restore(schedule([fit, ft, more]), out, record)
    assert again == [ft.run_dir(out, 1)] and (fit.run_dir(out, 1) / "checkpoint.safetensors").is_file()

    # a partial run is never thrown away: it resumes; one that died before its first checkpoint gives way
    out3 = tmp_path / "runs3"
    fit.run_dir(out3, 1).mkdir(parents=True)
    (fit.run_dir(out3, 1) / "checkpoint.safetensors").write_bytes(b"\0")
    restored, again = restore(schedule([fit]), out3, record)
    assert restored == [] == again and (fit.run_dir(out3, 1) / "checkpoint.safetensors").is_file()
    (fit.run_dir(out3, 1) / "checkpoint.safetensors").unlink()
    restored, _ = restore(schedule([fit]), out3, record)
    assert restored == [fit.run_dir(out3, 1)] and is_copy(fit.run_dir(out3, 1))
    assert not [p for p in fit.run_dir(out3, 1).parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_restored_run_names_where_it_and_its_sources_now_are(tmp_path, monkeypatch):
    """A record made under another checkout, with a relative grid directory: the restored config names
    the runs it built on under the new grid directory, as `Cell.config` does, so it counts as finished."""
    from perfit.config import from_toml
    from perfit.federation.run_directory import config_changes

    cell = next(c for c in personalization_grid() if c.name == "personal/dirichlet/fit-ft")
    old = cell.config(2, Path("/elsewhere/checkout/runs/personal"), data="d.jsonl")
    kept = _finished(tmp_path / "record" / cell.name / "seed2", big=False)
    (kept / "config.toml").write_text(old.to_toml())
    monkeypatch.chdir(tmp_path)
    out = Path("runs/personal")  # relative, as benchmarks/personal_grid.sh passes it
    restored, _ = restore([(cell, 2)], out, tmp_path / "record")
    config = from_toml(restored[0] / "config.toml")
    assert config.start_from == str((tmp_path / "runs/personal/personal/dirichlet/fit/seed2").resolve())
    fit = next(c for c in personalization_grid() if c.name == "personal/dirichlet/fit")
    _finished(fit.run_dir(out, 2))  # the run it starts from, here: the same config as the grid asks for
    assert config_changes(restored[0], cell.config(2, out, data="d.jsonl")) == []


TRANSCRIBED = {
    "personal/pathological/fit": {1e-3: 10.516, 3e-3: 10.335, 1e-2: 10.794},
    "personal/pathological/perfit": {1e-3: 10.711, 3e-3: 10.493, 1e-2: 11.034},
}


def test_transcribed_rates_count_without_running_unless_a_run_to_go_builds_on_them(tmp_path):
    cells = select(personalization_grid(), ["personal/pathological/fit", "personal/pathological/perfit*"])
    lrs = (1e-3, 3e-3, 1e-2)
    table = collect(cells, tmp_path, lrs, 2, TRANSCRIBED)
    fit = table["personal/pathological/fit"]
    assert fit["chosen_lr"] == 3e-3 and fit["transcribed"] == ["0.001", "0.003", "0.01"]
    assert "chosen_lr" not in table["personal/pathological/perfit-zero-b"]
    runs = tuning_cells(cells, lrs)
    left = {run.name for run in still_to_run(runs, TRANSCRIBED, tmp_path)}
    only = {run.name for run in still_to_run(runs, {}, tmp_path, {"personal/pathological/perfit-zero-b"})}
    assert only == {run.name for run in runs if "zero-b" in run.name} | {"personal/pathological/perfit/lr0.001"}
    # the paper's PerFIT is transcribed, but PerFIT from B = 0 keeps its first rate's masks: that one runs
    assert "personal/pathological/perfit/lr0.001" in left
    assert not {"personal/pathological/perfit/lr0.003", "personal/pathological/fit/lr0.003"} & left
    assert "personal/pathological/perfit-zero-b/lr0.01" in left
    finished = {run.name: run for run in runs}
    for name in ("personal/pathological/perfit-zero-b/lr0.001", "personal/pathological/perfit-zero-b/lr0.003",
                 "personal/pathological/perfit-zero-b/lr0.01"):  # fmt: skip
        _finished(finished[name].run_dir(tmp_path, 0))
    # once its dependents finished, the source need not run
    assert "personal/pathological/perfit/lr0.001" not in {r.name for r in still_to_run(runs, TRANSCRIBED, tmp_path)}
    # a run here wins over the transcribed value of its rate
    _finished(finished["personal/pathological/fit/lr0.01"].run_dir(tmp_path, 0), ppl=10.9)
    entry = collect(cells, tmp_path, lrs, 2, TRANSCRIBED)["personal/pathological/fit"]
    assert entry["validation_ppl"]["0.01"] == 10.9 and entry["transcribed"] == ["0.001", "0.003"]
    assert entry["chosen_lr"] == 3e-3
    text = tuning_markdown({"personal/pathological/fit": entry}, lrs, "cmd", "the notebook")
    assert "10.516†" in text and "10.900 |" in text and "†: transcribed" in text and "the notebook" in text


def test_read_transcribed_names_a_bad_field(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"source": "docs/experiments.md", "cells": {"a/b/fit": {"1e-3": 10.5}}}))
    assert read_transcribed(path) == ("docs/experiments.md", {"a/b/fit": {1e-3: 10.5}})
    path.write_text(json.dumps({"source": "", "cells": {}}))
    with pytest.raises(ValueError, match="field source"):
        read_transcribed(path)
    path.write_text(json.dumps({"source": "x", "cells": {"a/b/fit": {"1e-3": -1}}}))
    with pytest.raises(ValueError, match=r"cells\.a/b/fit\.1e-3"):
        read_transcribed(path)
    path.write_text(json.dumps({"source": "x", "cells": {"a/b/fit": {"fast": 10}}}))
    with pytest.raises(ValueError, match="not a rate"):
        read_transcribed(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a transcribed tuning file"):
        read_transcribed(path)


def test_bench_tune_with_a_record_runs_nothing_again_on_a_fresh_machine(tmp_path, monkeypatch):
    """A tuning run twice, the second time into an empty OUT beside the first one's record: nothing runs
    again, and the tuning.json is the same. With a transcribed file, FIT + FT's tuning runs FIT's
    chosen rate again (it starts from that run's adapter) and nothing else of FIT."""
    import perfit.cli.base as cli

    ran = []

    def fake_run(config):
        ppl = 20 - 1000 * config.lr
        _finished(Path(config.out), ppl)
        (Path(config.out) / "config.toml").write_text(config.to_toml())
        ran.append((Path(config.out).parent.parent.name, config.lr))
        return {"personalized_ppl": ppl, "wall_seconds": 1.0}

    monkeypatch.setattr(cli, "run_federation", fake_run)
    record = tmp_path / "record"

    def tune(out: str, *extra: str):
        args = ["bench", "tune", "--grid", "personal", "--out", str(tmp_path / out), "--docs",
                str(tmp_path / out / "docs"), "--lrs", "1e-3,3e-3", "--cells", "personal/pathological/fit*",
                "--data", "d.jsonl", "--record", str(record), *extra]  # fmt: skip
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "docs" / "tuning.json").read_text()), result.output

    first, _ = tune("a")
    assert sorted(ran) == [("fit", 1e-3), ("fit", 3e-3), ("fit-ft", 1e-3), ("fit-ft", 3e-3)]
    assert (record / "personal/pathological/fit-ft/lr0.003/seed0/summary.json").is_file()
    listing = CliRunner().invoke(cli.app, ["bench", "tune", "--grid", "personal", "--out", str(tmp_path / "b"),
                                           "--lrs", "1e-3,3e-3", "--cells", "personal/pathological/fit*",
                                           "--record", str(record), "--list"])  # fmt: skip
    assert listing.exit_code == 0 and "4 of 4 runs finished" in listing.output  # what the record holds counts
    second, output = tune("b")
    assert len(ran) == 4
    assert second["cells"] == first["cells"]
    moved = (tmp_path / "b/personal/pathological/fit-ft/lr0.001/seed0/config.toml").read_text()
    assert f'start_from = "{tmp_path / "b/personal/pathological/fit/lr0.003/seed0"}"' in moved  # where it now is

    transcribed = tmp_path / "transcribed.json"
    values = {"personal/pathological/fit": {"0.001": 19.0, "0.003": 16.5}}
    transcribed.write_text(json.dumps({"source": "the notebook", "cells": values}))
    record = tmp_path / "record2"
    third, _ = tune("c", "--transcribed", str(transcribed))
    assert sorted(ran[4:]) == [("fit", 3e-3), ("fit-ft", 1e-3), ("fit-ft", 3e-3)]  # FIT's 1e-3 is not run
    fit = third["cells"]["personal/pathological/fit"]
    assert fit["transcribed"] == ["0.001"] and fit["validation_ppl"]["0.003"] == 17.0  # the run here counts
    assert third["transcribed_source"] == "the notebook" and "--transcribed" in third["command"]

    # FIT + FT's cells alone (the script's groups without lanes): FIT's run they start from still runs
    record = tmp_path / "record3"
    args = ["bench", "tune", "--grid", "personal", "--out", str(tmp_path / "d"), "--docs", str(tmp_path / "d/docs"),
            "--lrs", "1e-3,3e-3", "--cells", "personal/pathological/fit-ft", "--data", "d.jsonl",
            "--record", str(record), "--transcribed", str(transcribed)]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert sorted(ran[7:]) == [("fit", 3e-3), ("fit-ft", 1e-3), ("fit-ft", 3e-3)]
    assert list(json.loads((tmp_path / "d/docs/tuning.json").read_text())["cells"]) == ["personal/pathological/fit-ft"]


def test_bench_paper_with_a_record_runs_nothing_again_on_a_fresh_machine(tmp_path, monkeypatch):
    import perfit.cli.base as cli

    ran = []

    def fake_run(config):
        _finished(Path(config.out), 10.0)
        (Path(config.out) / "config.toml").write_text(config.to_toml())
        ran.append(config.out)
        return {"personalized_ppl": 10.0, "wall_seconds": 1.0}

    monkeypatch.setattr(cli, "run_federation", fake_run)
    record = tmp_path / "record"
    for out in ("a", "b"):
        args = ["bench", "paper", "--grid", "personal", "--out", str(tmp_path / out), "--record", str(record),
                "--cells", "personal/dirichlet/fit", "--data", "d.jsonl"]  # fmt: skip
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
    assert len(ran) == 3 and all("/a/" in path for path in ran)  # three seeds, once
    assert sorted(p.name for p in (record / "personal/dirichlet/fit").iterdir()) == ["seed1", "seed2", "seed3"]
    assert is_copy(tmp_path / "b/personal/dirichlet/fit/seed2")


def test_a_run_waits_for_a_source_that_is_only_a_copy_from_the_record(tmp_path):
    """A copy holds no adapter: a run starting from it would fail in its first second; it waits instead."""
    from perfit.bench.experiments import run_grid

    cells = {c.name: c for c in personalization_grid()}
    fit, ft = cells["personal/dirichlet/fit"], cells["personal/dirichlet/fit-ft"]
    (_finished(fit.run_dir(tmp_path, 1), big=False) / RESTORED).write_text("put back\n")
    ran = []
    outcome = run_grid([ft], tmp_path, {"data": "d.jsonl"}, lambda config: ran.append(config) or {}, lambda _: None)
    assert ran == [] and outcome[0][2].startswith("failed: waits for")
    (fit.run_dir(tmp_path, 1) / RESTORED).unlink()  # the run itself, with its adapter
    outcome = run_grid([ft], tmp_path, {"data": "d.jsonl"}, lambda c: ran.append(c) or {"wall_seconds": 1}, print)
    assert len(ran) == 1 and outcome[0][2] == "ran"
