"""benchmarks/personal_grid.sh, the personalization grid's driver, with a stand-in `perfit` that
records its calls: what the script asks for after the tuning (the cross-evaluations, the held-out
cells of the chosen variant, the report) is checked in seconds, not at the end of a 20-hour grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

from perfit.bench.experiments import GRIDS, select
from perfit.bench.tuning import tuning_name

REPO = Path(__file__).resolve().parents[1]
BEST = {"pathological": "perfit-4", "dirichlet": "perfit-zero-b"}  # the variant each split's tuning favours
CHOSEN = "perfit-4"  # the one carried on in both: 10.0 and 10.1 against perfit-zero-b's 10.5 and 10.0
VARIANTS = ("perfit", "perfit-zero-b", "perfit-4", "perfit-gradient-4")  # PerFIT at homogeneous budgets


def _tuning(runs: Path) -> Path:
    """A finished tuning.json: every cell at 3e-3, the variant of BEST lowest in its split, CHOSEN
    lowest over both."""
    cells = {}
    for cell in GRIDS["personal"]():
        split, label = cell.name.split("/")[1:]
        best = 10.0 if label == BEST[split] else 10.1 if label == CHOSEN else 10.5
        cells[cell.name] = {"validation_ppl": {"0.001": 11.0, "0.003": best, "0.01": 12.0}, "chosen_lr": 0.003}
        run = runs / "tune-personal" / tuning_name(cell, 0.003) / "seed0"  # the run a cross-evaluation reads
        run.mkdir(parents=True)
        (run / "summary.json").write_text("{}")
    for docs in ("docs-first", "docs"):  # the headline cells' tuning.json, then the whole grid's
        tuning = runs / "tune-personal" / docs / "tuning.json"
        tuning.parent.mkdir(parents=True)
        tuning.write_text(json.dumps({"out": str(runs / "tune-personal"), "cells": cells}))
    return tuning


def _grid(tmp_path: Path, fail_on: str = "", lanes: int = 1) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the script (LANES=`lanes`) with a `perfit` that logs its arguments (one JSON list a call)
    and fails the tuning call whose --cells is `fail_on`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv's, by its own path
    (bin_dir / "python").chmod(0o755)
    fake = bin_dir / "perfit"
    fake.write_text(
        f'#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
        f"sys.exit(1 if {fail_on!r} and {fail_on!r} in sys.argv else 0)\n"
    )
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    env = {**os.environ, "BIN": str(bin_dir), "RUNS": str(runs), "LANES": str(lanes)}
    env["RECORD"] = str(tmp_path / "record")
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "personal_grid.sh"), "data.jsonl"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    logged = [json.loads(line) for line in calls.read_text().splitlines()] if calls.is_file() else []
    return done, logged


def _option(call: list[str], name: str) -> list[str]:
    return [call[i + 1] for i, arg in enumerate(call) if arg == name]


def _labels(call: list[str]) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = {split: set() for split in BEST}
    for name in _option(call, "--cells"):
        split, label = name.split("/")[1:]
        labels[split].add(label)
    return labels


def test_the_headline_runs_first_then_the_rest_of_the_tuning_the_held_out_runs_and_the_report(tmp_path):
    tuning = _tuning(tmp_path / "runs")
    fit = tmp_path / "runs/personal/personal/pathological/fit"  # FIT's held-out runs: one read, one to read
    for seed in (1, 2):
        (fit / f"seed{seed}").mkdir(parents=True)
        (fit / f"seed{seed}" / "summary.json").write_text("{}")
    (fit / "seed1" / "base.json").write_text("{}")
    done, calls = _grid(tmp_path)
    assert done.returncode == 0, done.stderr
    kinds = [c[1] if c[0] == "bench" else c[0] for c in calls]
    tunes = [c for c in calls if c[:2] == ["bench", "tune"]]
    assert [_option(c, "--cells") for c in tunes][0] == ["personal/pathological/fit"]
    assert len(tunes) == 14 and _option(tunes[-1], "--cells") == []  # 7 + 4 groups, 2 tuning.json passes, the record
    assert {tuple(_option(c, "--record")) for c in tunes} == {(str(tmp_path / "record" / "tune-personal"),)}
    assert all(_option(c, "--transcribed") == [] for c in tunes)  # none in this record
    first, whole = [c for c in calls if c[:2] == ["bench", "paper"]]
    # the headline's held-out runs come before the baselines are tuned: FIT, FIT + FT, PerFIT, the chosen one
    assert kinds.index("paper") < calls.index(["bench", "tune", *tunes[8][2:]])
    assert _option(tunes[8], "--cells") == ["personal/*/perfit-8-12-16"]  # the heterogeneous cell, with the rest
    headline = {c.name for c in select(GRIDS["personal"](), [p for t in tunes[:7] for p in _option(t, "--cells")])}
    assert {f"personal/{split}/{label}" for split in BEST for label in ("fit", "fit-ft", *VARIANTS)} == headline
    assert _option(first, "--tuned") == [str(tmp_path / "runs/tune-personal/docs-first/tuning.json")]
    bases = [c for c in calls if c[:2] == ["bench", "base"]]  # the base model on FIT's rows not yet read
    assert bases == [["bench", "base", str(fit / "seed2")]] and calls.index(bases[0]) == calls.index(first) + 1
    assert (tmp_path / "record/personal/personal/pathological/fit/seed1/base.json").is_file()  # kept at once
    headline_report = calls[calls.index(first) + 2]  # the headline's own report, before the rest is tuned
    assert headline_report[0] == "report" and _option(headline_report, "--out") == [
        str(tmp_path / "runs/personal/headline")
    ]
    assert _option(headline_report, "--personal-tuning") == _option(first, "--tuned")
    assert _labels(first) == dict.fromkeys(BEST, {"fit", "fit-ft", "perfit", CHOSEN})  # one variant in both
    crosses = [c[2] for c in calls if c[:2] == ["bench", "cross"]]
    out = tmp_path / "runs" / "tune-personal"
    expected = {
        str(out / tuning_name(cell, 0.003) / "seed0")
        for cell in GRIDS["personal"]()
        if cell.name.split("/")[2] in ("perfit", CHOSEN)
    }
    assert sorted(crosses) == sorted(expected) and len(crosses) == 4  # the paper's PerFIT and the chosen one
    last_tune = max(i for i, c in enumerate(calls) if c[:2] == ["bench", "tune"])
    assert last_tune > max(i for i, c in enumerate(calls) if c[:2] == ["bench", "cross"])
    assert _option(whole, "--tuned") == [str(tuning)] and _option(whole, "--grid") == ["personal"]
    assert _option(whole, "--lanes") == ["1"] and _option(whole, "--record") == [str(tmp_path / "record" / "personal")]
    for split in BEST:  # the variants not chosen are not run
        assert _labels(whole)[split] == {
            "fit", "fit-ft", "local", "fedsa", "perfit", CHOSEN, "perfit-8-12-16", "hetlora-8-12-16"
        }  # fmt: skip
    assert calls[-1][0] == "report" and _option(calls[-1], "--personal-tuning") == [str(tuning)]
    assert _option(calls[-1], "--personal-runs") == [str(tmp_path / "runs" / "personal")]


def test_a_failed_tuning_group_stops_the_script_before_the_held_out_runs(tmp_path):
    _tuning(tmp_path / "runs")
    done, calls = _grid(tmp_path, fail_on="personal/*/fedsa")
    assert done.returncode == 1 and "some tuning runs failed" in done.stderr
    assert len([c for c in calls if c[:2] == ["bench", "tune"]]) == 12  # the other groups still ran
    assert not [c for c in calls if c[:2] == ["bench", "cross"]]
    assert len([c for c in calls if c[:2] == ["bench", "paper"]]) == 1  # only the headline's held-out runs
    reports = [c for c in calls if c[0] == "report"]  # and their report, apart from docs/
    assert len(reports) == 1 and _option(reports[0], "--out") == [str(tmp_path / "runs/personal/headline")]
    (tmp_path / "again").mkdir()
    done, calls = _grid(tmp_path / "again", fail_on="personal/*/fit-ft")
    assert done.returncode == 1 and not [c for c in calls if c[:2] == ["bench", "paper"]]  # no headline yet


def test_a_tuning_it_cannot_read_or_without_a_chosen_variant_stops_it_before_any_held_out_run(tmp_path):
    """Before, a failed read inside `< <(...)` went unnoticed: no cross-evaluation, and `bench paper`
    without --cells, which runs every variant's held-out seeds."""
    tuning = _tuning(tmp_path / "runs")
    document = json.loads(tuning.read_text())
    del document["cells"]["personal/dirichlet/perfit-gradient-4"]["chosen_lr"]  # a variant not tuned to the end
    for docs in ("docs-first", "docs"):
        (tuning.parent.parent / docs / "tuning.json").write_text(json.dumps(document))
    done, calls = _grid(tmp_path)
    assert done.returncode != 0 and "no PerFIT variant chosen for ['pathological', 'dirichlet']" in done.stderr
    assert not [c for c in calls if c[0] == "report" or c[:2] in (["bench", "paper"], ["bench", "cross"])]
    broken = tmp_path / "broken"
    for path in (_tuning(broken / "runs"), broken / "runs/tune-personal/docs-first/tuning.json"):
        path.write_text("{not json")
    broken_done, broken_calls = _grid(broken)
    assert broken_done.returncode != 0 and "JSONDecodeError" in broken_done.stderr
    assert [c[:2] for c in broken_calls if c[0] != "bench" or c[1] != "tune"] == []


def test_in_lanes_each_part_of_the_tuning_is_one_call_and_the_held_out_runs_take_the_lanes(tmp_path):
    _tuning(tmp_path / "runs")
    transcribed = tmp_path / "record" / "tune-personal.transcribed.json"
    transcribed.parent.mkdir()
    transcribed.write_text("{}")
    done, calls = _grid(tmp_path, lanes=2)
    assert done.returncode == 0, done.stderr
    tunes = [c for c in calls if c[:2] == ["bench", "tune"]]
    assert len(tunes) == 5 and [_option(c, "--lanes") for c in tunes] == [["2"], [], ["2"], [], []]
    assert _option(tunes[0], "--cells")[-1] == "personal/*/fit-ft" and len(_option(tunes[2], "--cells")) == 4
    assert all(_option(c, "--transcribed") == [str(transcribed)] for c in tunes)  # the record's, where it has one
    first, whole = [c for c in calls if c[:2] == ["bench", "paper"]]
    assert _option(first, "--lanes") == _option(whole, "--lanes") == ["2"]
    assert len(_option(first, "--cells")) == 8 and len(_option(whole, "--cells")) == 16
