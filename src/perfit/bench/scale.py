"""`perfit bench scale`: whole simulated federations of 100 and 1,000 clients at the same clients
per round, side by side in one process: round wall time, the server's resident memory and the peak
resident memory of the whole simulation (server, Ray and the client process).

What the server keeps per client is its bit-packed mask (PerFIT) and its node id; a round's updates
are aggregated one at a time (`core.aggregate.Accumulator`), and the final evaluation covers a seeded
sample of `eval_clients` clients, so round cost depends on the clients per round, not on the
federation's size. Both federations use the same base config; only `num_clients` differs.

Each federation runs in its own freshly spawned process, so the second one's memory does not start
from what the first one left behind (Python heap, allocator arenas, caches): run one after the other
in one process, the second one's reading would carry the first one's leftovers (docs/speed.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from perfit.config import Config


class PeakMemory:
    """Samples the resident memory of this process and of all its descendants (Ray's raylet, GCS
    and worker processes) every `interval` seconds; keeps the peaks."""

    def __init__(self, interval: float = 0.25, pid: int | None = None) -> None:
        import psutil

        self._process = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak_total = self.peak_self = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                own = self._process.memory_info().rss
                children = self._process.children(recursive=True)
            except psutil.Error:  # the watched process has exited (also between these two reads)
                return
            total = own
            for child in children:
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # exited between listing and reading
                    continue
            self.peak_self, self.peak_total = max(self.peak_self, own), max(self.peak_total, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _simulate(config: Config, num_cpus: int | None, results: Any) -> None:
    """Child process: one federation; its perplexity (or the error) goes back through `results`."""
    from perfit.federation.simulation import run_simulation

    try:
        results.put({"personalized_ppl": run_simulation(config, num_cpus=num_cpus)["personalized_ppl"]})
    except BaseException as err:  # reported by the parent, which raises
        results.put({"error": f"{type(err).__name__}: {err}"})


def _outcome(child: Any, results: Any) -> dict[str, Any]:
    """What the child put on the queue, or why it put nothing (it died: killed, out of memory)."""
    import queue

    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not child.is_alive():
                return {"error": f"the process exited with code {child.exitcode} and reported nothing"}


def federation(config: Config, num_clients: int, out: Path, num_cpus: int | None = None) -> dict[str, Any]:
    """Run one simulated federation of `num_clients` in a fresh process; its round times and the
    memory peaks of that process (the server, Ray's driver) and of its whole tree."""
    import multiprocessing

    run = config.replace(num_clients=num_clients, out=str(out / f"clients-{num_clients}"))
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    child = spawn.Process(target=_simulate, args=(run, num_cpus, results))
    begin = time.perf_counter()
    child.start()
    try:
        with PeakMemory(pid=child.pid) as memory:
            outcome = _outcome(child, results)
        child.join()
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    wall = time.perf_counter() - begin
    if "error" in outcome:
        raise RuntimeError(f"federation of {num_clients} clients failed: {outcome['error']}")
    rounds = [json.loads(line) for line in (Path(run.out) / "metrics.jsonl").read_text().splitlines() if line]
    seconds = [r["seconds"] for r in rounds if not r.get("final")]
    return {
        "num_clients": num_clients,
        "round_seconds": seconds,
        "mean_round_seconds": sum(seconds) / len(seconds),
        "wall_seconds": wall,
        "peak_rss_gib": memory.peak_total / 2**30,
        "server_process_peak_rss_gib": memory.peak_self / 2**30,
        "personalized_ppl": outcome["personalized_ppl"],
    }


def bench_scale(config: Config, out: Path, sizes: tuple[int, int] = (100, 1000)) -> dict[str, Any]:
    """Both federations and the ratios; the key names assume the default sizes (100, 1000)."""
    small, large = (federation(config, n, out) for n in sizes)
    return {
        "config": config.to_dict(),
        "sizes": list(sizes),
        "federations": {str(small["num_clients"]): small, str(large["num_clients"]): large},
        "round_time_1000_over_100": large["mean_round_seconds"] / small["mean_round_seconds"],
        "server_rss_1000_minus_100_gib": large["server_process_peak_rss_gib"] - small["server_process_peak_rss_gib"],
        "peak_rss_gib": max(small["peak_rss_gib"], large["peak_rss_gib"]),
    }


def scale_markdown(result: dict[str, Any], command: str, machine: str) -> str:
    small, large = (result["federations"][str(n)] for n in result["sizes"])
    config = result["config"]
    rows = [
        f"| {f['num_clients']:,} | {', '.join(f'{s:.1f}' for s in f['round_seconds'])} | {f['mean_round_seconds']:.1f} "
        f"| {f['server_process_peak_rss_gib']:.2f} | {f['peak_rss_gib']:.2f} | {f['wall_seconds']:.0f} |"
        for f in (small, large)
    ]
    return "\n".join(
        [
            f"# Scale: {small['num_clients']:,} vs {large['num_clients']:,} simulated clients",
            "",
            f"`{command}` on {machine}. Both federations: {config['method']}, {config['clients_per_round']} clients",
            f"per round, {config['rounds']} rounds, {config['max_samples_per_client']} rows per client, cutoff "
            f"{config['cutoff_len']}, final evaluation of {config['eval_clients']} seeded clients; only the",
            "number of clients differs.",
            "",
            "| clients | round seconds | mean | server process peak RSS (GiB) | simulation peak RSS (GiB) | wall (s) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- round time 1,000 / 100 clients: **{result['round_time_1000_over_100']:.3f}** (target <= 1.2)",
            f"- server process memory, 1,000 minus 100 clients: "
            f"{result['server_rss_1000_minus_100_gib'] * 1024:.0f} MiB",
            f"- peak resident memory of a simulation: {result['peak_rss_gib']:.2f} GiB",
            "",
        ]
    )
