"""bench.lanes: a grid's cells in parallel lanes. A run shares its unit with the runs it builds on;
the lanes run every unit once, N at a time, each on its own cores; a stop reaches every lane; and
`perfit bench paper / tune --lanes 2` end to end on the tiny model."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perfit.bench.experiments import GRIDS, Cell, select
from perfit.bench.lanes import RUNNING_ELSEWHERE, STOP_SIGNALS, lane_cores, lane_env, lock_path, run_lanes, units
from perfit.federation.simulation import usable_cores

STAND_IN = textwrap.dedent(
    """
    import json, os, signal, sys, time
    record, unit, lane, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    def write(what):
        with open(record, "a") as f:
            f.write(json.dumps({"unit": unit, "lane": lane, "what": what, "pid": os.getpid(), "at": time.time(),
                                "omp": os.environ.get("OMP_NUM_THREADS"),
                                "cores": sorted(os.sched_getaffinity(0))}) + "\\n")
    signal.signal(signal.SIGINT, signal.SIG_IGN if unit == "stubborn" else lambda *_: (write("stopped"), sys.exit(0)))
    write("started")
    time.sleep(seconds)
    write("ended")
    sys.exit(3 if unit == "bad" else 0)
    """
)


def _stand_in(record: Path, seconds: float):
    return lambda unit, k: [sys.executable, "-c", STAND_IN, str(record), unit[0], str(k), str(seconds)]


def _records(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []


def _two_lanes() -> list[list[int]]:
    cores = usable_cores()
    return [[cores[0]], [cores[-1]]]  # two lanes even on one core: what is checked is the scheduling


def test_a_cell_shares_a_unit_with_every_run_it_builds_on():
    cells = GRIDS["personal"]()
    got = units(cells)
    assert got[0] == ["personal/pathological/fit", "personal/pathological/fit-ft"]  # start_from
    assert ["personal/dirichlet/perfit", "personal/dirichlet/perfit-zero-b"] in got  # masks_from
    assert sorted(name for unit in got for name in unit) == sorted(cell.name for cell in cells)
    assert len(got) == len(cells) - 4 and all(len(unit) == 1 for unit in got if "fit-ft" not in unit[-1]
                                              and "zero-b" not in unit[-1])  # fmt: skip
    alone = select(cells, ["personal/dirichlet/fit-ft", "personal/dirichlet/local"])  # its start finished before
    assert units(alone) == [["personal/dirichlet/fit-ft"], ["personal/dirichlet/local"]]
    chain = [Cell("c", "g", "s", "c", masks="b"), Cell("d", "g", "s", "d"), Cell("a", "g", "s", "a"),
             Cell("b", "g", "s", "b", start="a")]  # fmt: skip
    assert units(chain) == [["c", "a", "b"], ["d"]]  # c builds on b, which builds on a: one unit


def test_the_cores_split_into_equal_lanes_and_each_lane_runs_a_clients_share_of_threads(monkeypatch):
    assert lane_cores(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]  # core 4 idle: the lanes run alike
    assert lane_cores(1, [3, 5]) == [[3, 5]]
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"--lanes {bad}: between 1 and the 2 core"):
            lane_cores(bad, [0, 1])
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # set for the whole machine: not for a lane
    assert lane_env([0, 1, 2, 3], 2)["OMP_NUM_THREADS"] == "2" and lane_env([7], 2)["OMP_NUM_THREADS"] == "1"


def test_the_lanes_run_every_unit_once_two_at_a_time_each_on_its_own_cores(tmp_path):
    record, lanes, logs = tmp_path / "record.jsonl", _two_lanes(), tmp_path / "lanes"
    work = [["u0"], ["u1"], ["bad"], ["u3"], ["u4"], ["held"]]
    logs.mkdir()
    handlers = [signal.getsignal(signum) for signum in STOP_SIGNALS]
    reported = []
    with open(lock_path(logs, ["held"]), "w") as held:  # another command on the same grid is running "held"
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ended = run_lanes(work, _stand_in(record, 0.6), lanes, 2, logs, reported.append)
    assert [signal.getsignal(signum) for signum in STOP_SIGNALS] == handlers  # put back
    assert sorted(unit[0] for unit, _ in ended) == ["bad", "held", "u0", "u1", "u3", "u4"]
    assert {unit[0]: status for unit, status in ended} == {
        "u0": 0,
        "u1": 0,
        "bad": 3,
        "u3": 0,
        "u4": 0,
        "held": RUNNING_ELSEWHERE,
    }
    rows = _records(record)
    starts = {r["unit"]: r for r in rows if r["what"] == "started"}
    ends = {r["unit"]: r for r in rows if r["what"] == "ended"}
    assert sorted(starts) == sorted(ends) == ["bad", "u0", "u1", "u3", "u4"]  # each once; "held" not here
    for start in starts.values():
        assert start["cores"] == lanes[start["lane"]] and start["omp"] == "1"
    running = [
        sum(starts[u]["at"] <= ends[v]["at"] and starts[v]["at"] <= starts[u]["at"] for v in starts) for u in starts
    ]
    assert max(running) == 2  # two at once, never three
    assert any("bad: FAILED (exit 3" in line for line in reported)
    logs = [(tmp_path / "lanes" / f"lane{k}.log").read_text() for k in (0, 1)]
    assert sum(log.count("--- ") for log in logs) == 5


def test_a_stop_reaches_every_running_lane_and_a_second_one_kills_what_is_left(tmp_path):
    record = tmp_path / "record.jsonl"
    driver = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from perfit.bench.lanes import run_lanes
        stand_in = {STAND_IN!r}
        command = lambda unit, k: [sys.executable, "-c", stand_in, {str(record)!r}, unit[0], str(k), "60"]
        try:
            run_lanes([["u0"], ["stubborn"], ["u2"]], command, {_two_lanes()!r}, 2, Path({str(tmp_path / "lanes")!r}))
        except KeyboardInterrupt:
            sys.exit(130)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: len([r for r in _records(record) if r["what"] == "started"]) == 2)
        with open(lock_path(tmp_path / "lanes", ["u0"]), "w") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lane's process holds its unit
        parent.send_signal(signal.SIGTERM)
        _wait_for(lambda: [r["unit"] for r in _records(record) if r["what"] == "stopped"] == ["u0"])
        time.sleep(1)
        assert parent.poll() is None  # waits for the lane that ignores SIGINT
        parent.send_signal(signal.SIGTERM)  # the second stop kills it
        output, _ = parent.communicate(timeout=60)
    finally:
        parent.kill()
    assert parent.returncode == 130, output
    rows = _records(record)
    assert sorted(r["unit"] for r in rows if r["what"] == "started") == ["stubborn", "u0"]  # u2 never started
    assert [r["unit"] for r in rows if r["what"] != "started"] == [
        "u0"
    ]  # stopped; "stubborn" neither stopped nor ended
    assert "1 unit(s) not started" in output and "stubborn: FAILED (exit -9" in output  # killed, and waited for
    for pid in {r["pid"] for r in rows}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _tiny(tiny_model: Path, small_data: Path) -> list[str]:
    return ["--data", str(small_data), "--model", str(tiny_model)]


CELLS = ["ablation/pathological/tp-1", "ablation/pathological/alpha-16"]  # one seed each


def test_bench_paper_and_tune_in_two_lanes_end_to_end(tiny_model, small_data, tmp_path):
    from perfit.cli import app

    if len(usable_cores()) < 2:
        pytest.skip("two lanes need two cores")
    runner = CliRunner()
    selected = [arg for cell in CELLS for arg in ("--cells", cell)]
    grid = tmp_path / "grid"
    done = runner.invoke(
        app, ["bench", "paper", "--out", str(grid), "--lanes", "2", *selected, *_tiny(tiny_model, small_data)]
    )
    assert done.exit_code == 0, done.output
    for cell in CELLS:
        assert json.loads((grid / cell / "seed0" / "summary.json").read_text())["evaluated_on"] == "held_out"
        assert f"{cell}: finished" in done.output
    assert "seed 0: running" not in done.output  # the lanes ran them, not this process
    logs = [(grid / "lanes" / f"lane{k}.log").read_text() for k in (0, 1)]
    assert all(log.count("--- ") == 1 and log.count("seed 0: running") == 1 for log in logs)  # one cell a lane
    again = runner.invoke(
        app, ["bench", "paper", "--out", str(grid), "--lanes", "2", *selected, *_tiny(tiny_model, small_data)]
    )
    assert again.exit_code == 0 and "started" not in again.output  # finished cells start no lane
    tune, docs = tmp_path / "tune", tmp_path / "docs"
    tuned = runner.invoke(app, ["bench", "tune", "--out", str(tune), "--docs", str(docs), "--lrs", "1e-3",
                                "--lanes", "2", *selected, *_tiny(tiny_model, small_data)])  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    table = json.loads((docs / "tuning.json").read_text())["cells"]
    assert sorted(table) == sorted(CELLS) and all(entry["chosen_lr"] == 1e-3 for entry in table.values())
    assert tuned.output.count("started") == 2 and (tune / "lanes" / "docs0" / "tuning.json").is_file()
    more = runner.invoke(app, ["bench", "tune", "--out", str(tune), "--docs", str(docs), "--lrs", "1e-3,3e-3",
                               "--lanes", "2", "--cells", CELLS[0], *_tiny(tiny_model, small_data)])  # fmt: skip
    assert more.exit_code == 0 and more.output.count("started") == 1  # the cell with a new rate to try
    assert json.loads((docs / "tuning.json").read_text())["cells"][CELLS[0]]["validation_ppl"].keys() == {
        "0.001",
        "0.003",
    }
    too_many = runner.invoke(app, ["bench", "paper", "--out", str(grid), "--lanes", "99", *selected])
    assert too_many.exit_code == 2 and "--lanes 99: between 1 and the" in too_many.output
