"""Run the Flower app in this process on Flower's Simulation Runtime (Ray), with a perfit Config.

`flwr run .` runs the same ServerApp/ClientApp; this path exists so that `perfit run` and the tests
pass a Config straight in (Flower's public `run_simulation` takes no run config).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perfit.config import Config

CLIENT_CPUS = 2
"""Cores (torch threads) a simulated client gets by default: within one run on 2 cores, one 2-thread
client runs a quick-preset round as fast as two 1-thread clients, with one model copy in memory
instead of two (docs/speed.md). Two whole runs side by side at 1 thread each are another matter
(`perfit bench paper --lanes`, docs/experiments.md)."""


def usable_cores() -> list[int]:
    """The cores this process may run on (its CPU affinity: a container's or a lane's share), else
    all of the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def client_gpus(config: Config, actors: int) -> float:
    """The GPU share Ray gives each client process when clients train on `cuda` (auto or cuda without
    an index), else 0: Ray places a fractional share on one GPU, so the `actors` that run at once are
    packed ceil(actors / GPUs) to a GPU, each share rounded down to Ray's 1e-4 resource unit so that
    they fit. With an explicit `cuda:N` Ray assigns nothing and every process sees all GPUs
    (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0)."""
    from perfit.client.model import resolve_device

    if config.device not in ("auto", "cuda") or resolve_device(config.device).type != "cuda":
        return 0.0
    per_gpu = math.ceil(max(actors, 1) / _visible_gpus())
    return math.floor(10_000 / per_gpu) / 10_000


def _init_ray(init_args: dict[str, Any]) -> bool:
    """Start Ray before Flower does, with the app's import path in the environment that Ray's worker
    processes inherit instead of in a runtime env, as Flower's RayBackend passes it (it starts Ray
    only when none is running). With a runtime env, no worker Ray starts ahead can host a client:
    each client process starts anew through the runtime-env agent once the run asks for it.
    Returns whether it started Ray (False: the caller's own Ray was running)."""
    import ray

    if ray.is_initialized():  # the caller's own Ray: Flower uses it as it is
        return False
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = path
    ray.init(**init_args)
    return True


def _kill_descendants() -> None:
    """SIGKILL to every process this one started: Ray's, which the run no longer needs (some of its
    agents outlive their driver, or a SIGTERM). Nothing waits for them: while this thread waited,
    the server thread would record the client processes' deaths as failed rounds."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def _stop_at_once_on_signals(out: str, ray_dir: str, ours: bool) -> Iterator[None]:
    """While a simulated run is going, SIGINT (Ctrl-C) and SIGTERM end its process at once (exit
    status 128 + the signal's number) without recording the round in flight: the run resumes from
    its last checkpoint, which is written atomically after every round.

    Left to Flower and Ray, the signal also reaches Ray's client processes. The server (a thread
    Flower does not mark daemon) took their deaths for failed clients, so a round could count
    on fewer clients than it sampled, and it then waited `reply_timeout_seconds` for replies that
    never come. The Ray this run started (`ours`) is ended with it and its session files in
    `ray_dir` removed; a caller's own Ray, or a run off the main thread (where Python cannot set
    handlers), keeps the usual handling. The previous handlers come back after the run."""
    if not ours or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        try:  # raw writes: the main thread may be inside a buffered write, which must not be re-entered
            name = signal.Signals(signum).name
            os.write(
                2,
                f"\nperfit: stopped by {name}; {out} resumes from its last checkpoint (perfit run --resume)\n".encode(),
            )
            if os.isatty(1):
                os.write(1, b"\x1b[?25h")  # the cursor Rich's progress bar hid
            _kill_descendants()
            remove = ["rm", "-rf", ray_dir]  # not waited for, like the processes above
            subprocess.Popen(remove, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ray_backend(config: Config, cpus: int, cpus_per_client: int, ray_dir: str) -> dict[str, Any]:
    """Flower's Ray backend config: each simulated client's share of the `cpus` cores (and of a GPU,
    `client_gpus`), Ray started quiet, without a dashboard, its session files in `ray_dir`."""
    gpus = client_gpus(config, cpus // min(cpus_per_client, cpus))
    return {
        "client_resources": {"num_cpus": min(cpus_per_client, cpus), "num_gpus": gpus},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": _visible_gpus(),
            "logging_level": "ERROR",
            "log_to_driver": False,  # client failures reach the server as error replies
            "include_dashboard": False,
            "_temp_dir": ray_dir,
        },
    }


def _check_nodes_kept(config: Config, nodes: Path) -> None:
    """A resumed run of a method whose nodes keep values (`resume_reads_nodes`) needs them in `nodes`:
    without them each client would restart from nothing while the server goes on, so this is an error."""
    from perfit.core.methods import resume_reads_nodes
    from perfit.federation.run_directory import resumes_from_checkpoint

    if resume_reads_nodes(config.method) and resumes_from_checkpoint(config) and not nodes.is_dir():
        raise ValueError(
            f"{config.out}: a simulated {config.method} run cannot resume without its nodes' kept values "
            f"({nodes} is missing: the run stopped before perfit kept them on disk); run it again without resume"
        )


def _server_run(config: Config) -> tuple[Any, Any]:
    """The Flower `Run` (id 1, no federation) and the ServerApp's `Context` carrying `config` as its
    run config, as `flwr run` would set them up; the task identity is the SuperLink's."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    run = Run.create_empty(run_id=1)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run.run_id, 1, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_dict())
    return run, context


def run_simulation(
    config: Config, num_cpus: int | None = None, cpus_per_client: int = CLIENT_CPUS, client_app: Any = None
) -> dict[str, Any]:
    """Run one federation to completion and return its summary (also in `<out>/summary.json`).

    `client_app` replaces perfit's ClientApp (e.g. a wrapped one that injects faults in tests). The
    nodes of a method whose clients keep values the server never sees (`core.methods.NODE_KEPT`)
    keep them on disk, in `<out>/nodes/`, so that the run resumes exactly; the folder goes once the
    run has finished.

    Each simulated client gets `cpus_per_client` cores (torch threads, `CLIENT_CPUS`) of the
    `num_cpus` (default: the cores this process may use, `usable_cores`).
    """
    from perfit.core.methods import NODE_KEPT
    from perfit.federation.run_directory import NODES

    out = Path(config.out).expanduser().resolve()
    keeping = config.method in NODE_KEPT
    _check_nodes_kept(config, out / NODES)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import ray
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from perfit.federation.client_app import KeepingNodes
    from perfit.federation.client_app import app as perfit_client_app
    from perfit.federation.run_directory import read_summary
    from perfit.federation.server_app import app as server_app

    app = client_app or perfit_client_app
    run, context = _server_run(config)
    ray_dir = tempfile.mkdtemp(prefix="perfit-ray-")  # Ray's session files stay out of ~ and of the repo
    backend = _ray_backend(config, num_cpus or len(usable_cores()), cpus_per_client, ray_dir)
    try:
        started = _init_ray(backend["init_args"])  # Ray sets handlers of its own at its start: ours come after
        with _stop_at_once_on_signals(config.out, ray_dir, started):
            _run_simulation(
                num_supernodes=config.num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=KeepingNodes(app, str(out / NODES)) if keeping else app,
                server_app=server_app,
                backend_name="ray",
                backend_config=backend,
                run=run,
                server_app_context=context,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    summary = read_summary(out / "summary.json")
    shutil.rmtree(out / NODES, ignore_errors=True)  # finished: nothing resumes from it
    return summary
