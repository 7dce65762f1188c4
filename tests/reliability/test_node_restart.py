"""Restarts on the Deployment Engine lose nothing a run keeps. A SuperNode killed (SIGKILL) between two
rounds and restarted finds its mask and the values that never leave it (FedSA-LoRA's B) in its
state-dir; a SuperLink killed in the middle of a round, with its ServerApp, is restarted and the run
resumed from the server's checkpoint, while a node has already kept a B newer than that checkpoint.
Both runs end with the per-client perplexities of an uninterrupted one, and every node with its
owner's adapter in its state-dir. TLS and node authentication, everything on 127.0.0.1 and stopped at
the end."""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from perfit.config import Config
from perfit.federation.simulation import run_simulation

from ..tiny import TINY_RUN, cli_args
from .test_deployment import BIN, DEPLOY, REPO, _env, _flwr, _free_ports, _https_ok, _ours, _start, _stop_all
from .test_resume import _checkpoint_round

pytestmark = pytest.mark.skipif(not (DEPLOY / "make_certs.sh").is_file(), reason="no deployment scripts")

NODES, PER_ROUND, ROUNDS = 3, 2, 3


def _sampled(seed: int) -> list[list[int]]:
    """The clients the server samples each round (its seeded sampler, replayed)."""
    sampler = random.Random(seed)
    return [sorted(sampler.sample(range(NODES), PER_ROUND)) for _ in range(ROUNDS)]


def _fields(tiny_model: Path, small_data: Path, seed: int) -> dict:
    return {
        **TINY_RUN,
        **dict(method="fedsa", num_clients=NODES, clients_per_round=PER_ROUND, rounds=ROUNDS, seed=seed),
        **dict(max_samples_per_client=24, cutoff_len=512, lr=1e-2, model=str(tiny_model), data=str(small_data)),
    }


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class _Federation:
    """A SuperLink (TLS, node authentication, its state database under its own FLWR_HOME, so a restart
    keeps the nodes' registrations) and one SuperNode per client, each with its own state-dir. Every
    process starts in a session of its own, so a kill reaches its children (a SuperLink's ServerApp, a
    SuperNode's ClientApps)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path, self.certs, self.state = tmp_path, tmp_path / "certs", tmp_path / "state"
        subprocess.run([str(DEPLOY / "make_certs.sh"), str(self.certs), str(NODES)], check=True, capture_output=True)
        self.port, *self.node_ports = _free_ports(NODES + 1)
        (tmp_path / "cli-home").mkdir()
        (tmp_path / "cli-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def superlink(self) -> subprocess.Popen:
        started = _start(
            [str(DEPLOY / "superlink.sh"), str(self.certs)],
            self.tmp_path / f"superlink-{time.monotonic_ns()}.log",
            _env(self.tmp_path, "superlink-home", SUPERLINK_PORT=str(self.port)),
        )
        ca = self.certs / "ca.crt"
        _wait_for(lambda: _https_ok(f"https://127.0.0.1:{self.port}/health", ca), 60, "the SuperLink")
        assert started.poll() is None
        return started

    def register(self) -> None:
        for k in range(NODES):
            registered = _flwr(self.tmp_path, "supernode", "register", str(self.certs / f"supernode-{k}.pub"), "fed")
            assert registered.returncode == 0, registered.stdout + registered.stderr

    def supernode(self, k: int) -> subprocess.Popen:
        command = [str(DEPLOY / "supernode.sh"), f"127.0.0.1:{self.port}", str(self.certs / "ca.crt")]
        env = _env(
            self.tmp_path,
            f"node-{k}-home",
            SUPERNODE_PORT=str(self.node_ports[k]),
            PERFIT_STATE_DIR=str(self.state / f"node-{k}"),
        )
        log = self.tmp_path / f"node-{k}-{time.monotonic_ns()}.log"
        return _start([*command, str(self.certs / f"supernode-{k}"), str(k), str(NODES)], log, env)

    def kept(self, k: int, version: int) -> bool:
        """Whether node k has kept the B its client trained in round `version`."""
        return any((self.state / f"node-{k}").glob(f"run-*/personal@{version}.safetensors"))

    def submit(self, fields: dict, out: Path) -> int:
        run_config = subprocess.run(
            [str(BIN / "perfit"), "config", "--flwr", *cli_args(fields), "--out", str(out)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "fed", "--format", "json", "--run-config", run_config],
            capture_output=True, text=True, cwd=REPO, env=_env(self.tmp_path, "cli-home"), timeout=120,
        )  # fmt: skip
        return json.loads(submitted.stdout)["run-id"]

    def status(self, run_id: int) -> str:
        listed = _flwr(self.tmp_path, "list", "fed", "--run-id", str(run_id), "--format", "json")
        return json.loads(listed.stdout)["runs"][0]["status"]

    def wait_finished(self, run_id: int) -> None:
        _wait_for(lambda: self.status(run_id).startswith("finished"), 420, "the run to finish")
        assert self.status(run_id).startswith("finished:completed"), self.status(run_id)

    def online(self) -> int:
        listed = _flwr(self.tmp_path, "supernode", "list", "fed", "--format", "json")
        return sum(node["status"] == "online" for node in json.loads(listed.stdout)["nodes"])


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, small_data, tmp_path_factory) -> dict:
    """The summary of the run both tests interrupt, run in simulation without a stop."""
    fields = _fields(tiny_model, small_data, SEED)
    reference = run_simulation(Config(**{**fields, "out": str(tmp_path_factory.mktemp("uninterrupted"))}), num_cpus=2)
    assert set(reference["per_client_ppl"]) == {str(k) for k in range(NODES)}  # every client measured
    assert all(value > 1 for value in reference["per_client_ppl"].values())
    return reference


def _ends_as_uninterrupted(federation: _Federation, fields: dict, out: Path, reference: dict) -> dict:
    """The run's rounds sampled the seeded clients, rejected nothing, restarted no kept values, and
    every client's perplexity is the uninterrupted run's; each node kept its B by round and, at the
    end, its owner's adapter in PEFT format. Returns the run's summary."""
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds if not r.get("final")] == _sampled(fields["seed"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_updates"] == [] and summary["kept_lost"] == []
    assert set(summary["per_client_ppl"]) == set(reference["per_client_ppl"])
    for client, value in reference["per_client_ppl"].items():
        assert summary["per_client_ppl"][client] == pytest.approx(value, rel=1e-4), client
    for k in range(NODES):
        (kept,) = (federation.state / f"node-{k}").glob("run-*")
        versions = {int(path.stem.split("@")[1]) for path in kept.glob("personal@*.safetensors")}
        assert versions and versions <= set(range(1, ROUNDS + 1))  # B by the round that trained it
        assert (kept / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((kept / "adapter" / "adapter_config.json").read_text())["r"] == 4
    return summary


def _roles() -> tuple[int, int, int, int]:
    """The first seed with a client sampled in rounds 1 and 3 but not 2 (`victim`: killed after
    round 1, it is away while round 2 runs without it, and needs what it kept in round 3 and the
    final evaluation), and whose round 2 samples one client that trained in round 1 (`ahead`: it
    keeps a B of round 2 newer than the checkpoint of round 1) and one that did not (`held`: frozen,
    it keeps round 2 from ending, so the server cannot checkpoint it). Both tests interrupt the run
    of this seed, so one uninterrupted run is the reference of both. (seed, victim, ahead, held)"""
    for seed in range(100):
        first, second, third = _sampled(seed)
        victims = [c for c in first if c not in second and c in third]
        ahead, held = [c for c in second if c in first], [c for c in second if c not in first]
        if victims and len(ahead) == len(held) == 1:
            return seed, victims[0], ahead[0], held[0]
    raise AssertionError("no seed samples a client in rounds 1 and 3 only, and one of round 1 again in round 2")


SEED, VICTIM, AHEAD, HELD = _roles()


def test_a_killed_supernode_restarts_with_what_it_kept(tiny_model, small_data, tmp_path, uninterrupted):
    victim, fields, out = VICTIM, _fields(tiny_model, small_data, SEED), tmp_path / "out"
    federation = _Federation(tmp_path)
    try:
        federation.superlink()
        federation.register()
        nodes = {k: federation.supernode(k) for k in range(NODES)}
        run_id = federation.submit(fields, out)
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, 300, "round 1")
        os.killpg(nodes[victim].pid, signal.SIGKILL)  # the SuperNode and its SuperExec / ClientApp children
        nodes[victim].wait()
        # the SuperLink refuses a node's key while it still counts the node online (until its heartbeat lapses)
        _wait_for(lambda: federation.online() == NODES - 1, 300, "the SuperLink to see the node gone")
        nodes[victim] = federation.supernode(victim)
        federation.wait_finished(run_id)
    finally:
        _stop_all(tmp_path)
    assert _ours(tmp_path) == []
    _ends_as_uninterrupted(federation, fields, out, uninterrupted)


def test_a_superlink_killed_in_a_round_resumes_from_the_checkpoint_the_nodes_are_ahead_of(
    tiny_model, small_data, tmp_path, uninterrupted
):
    """The SuperLink is killed with its ServerApp after node `ahead` trained round 2 and before the
    round could end: the checkpoint is round 1's and `ahead` has kept a B of round 2. The restarted
    SuperLink (its database keeps the nodes' registrations) runs the resumed run: round 2 again, from
    the B `ahead` kept in round 1, as the checkpoint names; a node continuing from its newest B would
    train round 2 twice."""
    ahead, held, fields, out = AHEAD, HELD, _fields(tiny_model, small_data, SEED), tmp_path / "out"
    federation = _Federation(tmp_path)
    try:
        superlink = federation.superlink()
        federation.register()
        nodes = {k: federation.supernode(k) for k in range(NODES)}
        federation.submit(fields, out)
        _wait_for(lambda: federation.kept(ahead, 1), 300, "round 1's training")
        os.killpg(nodes[held].pid, signal.SIGSTOP)  # round 2 waits for its reply
        # well before the server gives up on the stopped node (its heartbeat lapses after about a
        # minute, and it waits 3 more for the node to return) and counts round 2 without it
        _wait_for(lambda: federation.kept(ahead, 2), 120, "round 2's training")
        assert (out / "metrics.jsonl").read_text().count("\n") == 1  # round 1's line only
        os.killpg(superlink.pid, signal.SIGKILL)  # the SuperLink, its SuperExec and the ServerApp
        superlink.wait()
        assert _checkpoint_round(out) == 1
        os.killpg(nodes[held].pid, signal.SIGCONT)
        federation.superlink()
        federation.wait_finished(federation.submit({**fields, "resume": 1}, out))
    finally:
        _stop_all(tmp_path)
    assert _ours(tmp_path) == []
    summary = _ends_as_uninterrupted(federation, fields, out, uninterrupted)
    assert summary["resumed_at_round"] == 2
