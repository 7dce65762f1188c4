"""Run a grid's cells in parallel lanes: N `perfit bench` processes at once, each on its own cores.

One run does not keep a small CPU busy: on the 2-core EPYC one 2-thread training step took 2.07 s
and two 1-thread steps side by side 3.49 s each, so two 1-thread runs at once do 1.19x the work of
one 2-thread run (docs/experiments.md). `perfit bench paper --lanes N` and `perfit bench tune
--lanes N` split the cores this process may use into N equal sets and run the grid's cells in N
lanes: each lane is a `perfit bench` process of its own, pinned to its set (CPU affinity) with
OMP_NUM_THREADS at a client's share of it, that takes the next unit of cells when its last one ends.

A cell that builds on another cell's run (`Cell.start`, `Cell.masks`) shares a unit with it
(`units`), so no run waits on one another lane has not finished. The lanes write into the same grid
directory (each run has its own) and log to `<out>/lanes/lane<k>.log`. A unit that fails is named,
and the lanes go on with the others; a stop (Ctrl-C, SIGINT, SIGTERM) is passed on to every lane,
whose runs keep their checkpoints, and the same command resumes them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def units(cells: Sequence[Any]) -> list[list[str]]:
    """The cells' names grouped so that a cell shares a unit with every cell of `cells` its runs build
    on (`Cell.sources`: start_from, masks_from), and with those that build on it; units in the order
    of their first cell, cells in the grid's order. A source outside `cells` must be finished
    already, as it must when the grid runs in one process."""
    names = [cell.name for cell in cells]
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for cell in cells:
        for source in cell.sources.values():
            if source in parent:
                parent[root(cell.name)] = root(source)
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(root(name), []).append(name)
    return list(grouped.values())


def lane_cores(lanes: int, cores: Sequence[int]) -> list[list[int]]:
    """`cores` split into `lanes` equal sets (the remainder left idle, so lanes run alike)."""
    if lanes < 1 or lanes > len(cores):
        raise ValueError(f"--lanes {lanes}: between 1 and the {len(cores)} core(s) this process may use")
    per = len(cores) // lanes
    return [list(cores[k * per : (k + 1) * per]) for k in range(lanes)]


def lane_env(cores: Sequence[int], client_cpus: int) -> dict[str, str]:
    """A lane's environment: torch threads at one simulated client's share of its cores. Set, not left
    to Ray (which sets a client's threads only where OMP_NUM_THREADS is unset): a value set for
    the whole machine would put its threads on every lane's fewer cores."""
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, min(len(cores), client_cpus)))}


def run_lanes(
    work: Sequence[list[str]],
    command: Callable[[list[str], int], list[str]],
    cores: Sequence[Sequence[int]],
    client_cpus: int,
    logs: Path,
    report: Callable[[str], None] = print,
) -> list[tuple[list[str], int]]:
    """Run `command(unit, lane)` for every unit of `work`, one lane per set of `cores`, each lane
    taking the next unit when its last one ends; returns (unit, exit status) in the order they
    ended. A stop signal to this process is passed on to the running lanes, which are waited for;
    units not started then are left out, and the KeyboardInterrupt is raised again."""
    logs.mkdir(parents=True, exist_ok=True)
    queue, lock = deque(work), threading.Lock()
    running: dict[int, subprocess.Popen] = {}
    ended: list[tuple[list[str], int]] = []
    stopping = threading.Event()

    def lane(k: int) -> None:
        while True:
            with lock:  # a unit leaves the queue only as its process starts: a stop loses none
                if stopping.is_set() or not queue:
                    return
                unit = queue.popleft()
                names = ", ".join(unit)
                with open(logs / f"lane{k}.log", "a") as log:  # the process keeps its own copy
                    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {names}\n")
                    log.flush()
                    running[k] = subprocess.Popen(  # its own session: a terminal's Ctrl-C reaches it once, from here
                        command(unit, k),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=lane_env(cores[k], client_cpus),
                        start_new_session=True,
                    )
                process = running[k]
            if hasattr(os, "sched_setaffinity"):  # the threads it starts later inherit it
                with contextlib.suppress(ProcessLookupError):  # ended already
                    os.sched_setaffinity(process.pid, cores[k])
            report(f"lane {k} (cores {','.join(map(str, cores[k]))}): {names}: started")
            started = time.monotonic()
            status = process.wait()
            with lock:
                running.pop(k, None)
                ended.append((unit, status))
            what = "finished" if status == 0 else f"FAILED (exit {status}; lanes/lane{k}.log)"
            report(f"lane {k}: {names}: {what} in {time.monotonic() - started:.0f} s")

    threads = [threading.Thread(target=lane, args=(k,), daemon=True) for k in range(len(cores))]
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        stopping.set()
        with lock:
            for process in running.values():
                process.send_signal(signal.SIGINT)  # each run keeps its checkpoint and exits
        for thread in threads:
            thread.join()
        report(f"stopped: {len(queue)} unit(s) not started; the same command resumes the grid")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return ended
