"""Run a grid's cells in parallel lanes: N `perfit bench` processes at once, each on its own cores.

One run does not keep a small CPU busy: on 2 cores two 1-thread runs side by side do more work than
one 2-thread run (measured in docs/experiments.md, "Two runs at a time"). `perfit bench paper
--lanes N` and `perfit bench tune --lanes N` split the cores this process may use into N equal sets
and run the grid in N lanes: each lane is a `perfit bench` process of its own, pinned to its set
(CPU affinity) with OMP_NUM_THREADS at a client's share of it, that takes the next unit of cells
when its last one ends.

A cell that builds on another cell's run (`Cell.start`, `Cell.masks`) shares a unit with it
(`units`), so no run waits on one another lane has not finished; a unit runs all its seeds, so a
grid stopped half-way has every seed of some cells rather than one seed of every cell. The lanes
write into the same grid directory (each run has its own) and log to `<out>/lanes/lane<k>.log`. A
lane holds its unit's lock file (`<out>/lanes/*.lock`) while it runs, so a second command on the
same grid skips that unit rather than running it twice. A unit that fails is named and the lanes go
on with the others. A stop (Ctrl-C, SIGINT, SIGTERM, SIGHUP) is passed on to every lane, whose runs
keep their checkpoints (the same command resumes them); a second stop kills the lanes at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COULD_NOT_START = -1
"""A unit's status when its process could not be started (e.g. out of memory or file handles)."""
RUNNING_ELSEWHERE = -2
"""A unit's status when another command on the same grid holds its lock."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each stops the lanes as Ctrl-C does (a closed terminal too: lanes must not outlive the command)."""


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


def lock_path(logs: Path, unit: list[str]) -> Path:
    """The file a lane running `unit` holds locked (flock) until its process ends."""
    return logs / f"{hashlib.sha256('|'.join(unit).encode()).hexdigest()[:16]}.lock"


class _Lanes:
    """The lanes' shared state: the units to go, the running processes, those that ended."""

    def __init__(self, work: Sequence[list[str]], command: Callable[[list[str], int], list[str]],
                 cores: Sequence[Sequence[int]], client_cpus: int, logs: Path,
                 report: Callable[[str], None]) -> None:  # fmt: skip
        self.queue, self.lock, self.stopping = deque(work), threading.Lock(), threading.Event()
        self.command, self.cores, self.client_cpus, self.logs, self.report = command, cores, client_cpus, logs, report
        self.running: dict[int, subprocess.Popen] = {}
        self.ended: list[tuple[list[str], int]] = []
        self.done = [False] * len(cores)

    def _start(self, unit: list[str], k: int) -> subprocess.Popen | None:
        """Lane k's process for `unit`, holding the unit's lock; None where another command holds it."""
        with open(lock_path(self.logs, unit), "w") as lock_file:  # the process keeps the lock until it ends
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            with open(self.logs / f"lane{k}.log", "a") as log:  # the process keeps its own copy
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {', '.join(unit)}\n")
                log.flush()
                return subprocess.Popen(  # its own session: a terminal's Ctrl-C reaches it once, from here
                    self.command(unit, k), stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock_file.fileno(),),
                    env=lane_env(self.cores[k], self.client_cpus), start_new_session=True,
                )  # fmt: skip

    def lane(self, k: int) -> None:
        """Take units until none is left or the lanes stop."""
        try:
            self._take_units(k)
        finally:
            self.done[k] = True

    def wait(self) -> None:
        """Until every lane is done. Polled with sleeps: a stop signal interrupts a sleep safely,
        where one that interrupts `Thread.join` can leave the thread reported as ended while it runs."""
        while not all(self.done):
            time.sleep(0.2)

    def _take_units(self, k: int) -> None:
        while True:
            with self.lock:  # a unit leaves the queue only as its process starts: a stop loses none
                if self.stopping.is_set() or not self.queue:
                    return
                unit = self.queue.popleft()
                try:
                    process = self._start(unit, k)
                except OSError as err:  # cannot start a process: the unit failed, the lane goes on
                    self.report(f"lane {k}: {', '.join(unit)}: FAILED to start ({err})")
                    self.ended.append((unit, COULD_NOT_START))
                    continue
                if process is None:  # failed here: this command must not run it either
                    self.report(f"lane {k}: {', '.join(unit)}: FAILED (another command is running it)")
                    self.ended.append((unit, RUNNING_ELSEWHERE))
                    continue
                self.running[k] = process
            if hasattr(os, "sched_setaffinity"):  # the threads it starts later inherit it
                with contextlib.suppress(ProcessLookupError):  # ended already
                    os.sched_setaffinity(process.pid, self.cores[k])
            self.report(f"lane {k} (cores {','.join(map(str, self.cores[k]))}): {', '.join(unit)}: started")
            started = time.monotonic()
            status = process.wait()
            with self.lock:
                self.running.pop(k, None)
                self.ended.append((unit, status))
            what = "finished" if status == 0 else f"FAILED (exit {status}; lanes/lane{k}.log)"
            self.report(f"lane {k}: {', '.join(unit)}: {what} in {time.monotonic() - started:.0f} s")

    def signal_running(self, signum: int) -> None:
        with self.lock:
            self.stopping.set()
            for process in self.running.values():
                with contextlib.suppress(ProcessLookupError):
                    if signum == signal.SIGKILL:  # the lane's whole session: its Ray workers too
                        os.killpg(process.pid, signum)
                    else:
                        process.send_signal(signum)


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
    ended (or `COULD_NOT_START`, `RUNNING_ELSEWHERE`). A stop signal is passed on to the running
    lanes as SIGINT and they are waited for (a second one kills them); units not started are left
    out, and the KeyboardInterrupt is raised again."""
    logs.mkdir(parents=True, exist_ok=True)
    lanes = _Lanes(work, command, cores, client_cpus, logs, report)
    threads = [threading.Thread(target=lanes.lane, args=(k,), daemon=True) for k in range(len(cores))]
    # SIGINT too: a parent started with it ignored (`cmd &` in a script) would pass that on to the lanes
    previous = {signum: signal.signal(signum, signal.default_int_handler) for signum in STOP_SIGNALS}
    try:
        for thread in threads:
            thread.start()
        lanes.wait()
    except KeyboardInterrupt:
        lanes.signal_running(signal.SIGINT)  # each run keeps its checkpoint and exits
        try:
            lanes.wait()
        except KeyboardInterrupt:
            lanes.signal_running(signal.SIGKILL)
            lanes.wait()
        report(f"stopped: {len(lanes.queue)} unit(s) not started; the same command resumes the grid")
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return lanes.ended
