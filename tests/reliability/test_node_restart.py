"""A SuperNode killed (SIGKILL) between two rounds and restarted loses nothing it keeps: its mask and
the values that never leave it (FedSA-LoRA's B) are in its state-dir, so the run ends with the same
per-client perplexities as an uninterrupted one; and every node ends with its owner's adapter there.
Deployment Engine with TLS and node authentication, everything on 127.0.0.1 and stopped at the end."""

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

pytestmark = pytest.mark.skipif(not (DEPLOY / "make_certs.sh").is_file(), reason="no deployment scripts")


def _sampled(seed: int, clients: int, per_round: int, rounds: int) -> list[list[int]]:
    """The clients the server samples each round (its seeded sampler, replayed)."""
    sampler = random.Random(seed)
    return [sorted(sampler.sample(range(clients), per_round)) for _ in range(rounds)]


def _victim_and_seed() -> tuple[int, int]:
    """A seed and a client sampled in rounds 1 and 3 but not 2: killed after round 1, it is away
    while round 2 runs without it, and needs what it kept in round 3 and the final evaluation."""
    for seed in range(100):
        rounds = _sampled(seed, 3, 2, 3)
        for client in rounds[0]:
            if client not in rounds[1] and client in rounds[2]:
                return client, seed
    raise AssertionError("no seed samples a client in rounds 1 and 3 only")


def _online(tmp_path: Path) -> int:
    listed = _flwr(tmp_path, "supernode", "list", "fed", "--format", "json")
    return sum(node["status"] == "online" for node in json.loads(listed.stdout)["nodes"])


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_killed_supernode_restarts_with_what_it_kept(tiny_model, small_data, tmp_path):
    victim, seed = _victim_and_seed()
    fields = {**TINY_RUN, "method": "fedsa", "num_clients": 3, "clients_per_round": 2, "rounds": 3, "seed": seed}
    fields.update(max_samples_per_client=24, cutoff_len=512, lr=1e-2, model=str(tiny_model), data=str(small_data))
    out = tmp_path / "out"
    certs, state = tmp_path / "certs", tmp_path / "state"
    subprocess.run([str(DEPLOY / "make_certs.sh"), str(certs), "3"], check=True, capture_output=True)
    port, *node_ports = _free_ports(4)
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )

    def supernode(k: int) -> subprocess.Popen:
        command = [
            str(DEPLOY / "supernode.sh"),
            f"127.0.0.1:{port}",
            str(certs / "ca.crt"),
            str(certs / f"supernode-{k}"),
        ]
        env = _env(
            tmp_path, f"node-{k}-home", SUPERNODE_PORT=str(node_ports[k]), PERFIT_STATE_DIR=str(state / f"node-{k}")
        )
        return _start([*command, str(k), "3"], tmp_path / f"node-{k}-{time.monotonic_ns()}.log", env)

    try:
        superlink = _start(
            [str(DEPLOY / "superlink.sh"), str(certs)],
            tmp_path / "superlink.log",
            _env(tmp_path, "superlink-home", SUPERLINK_PORT=str(port)),
        )
        _wait_for(lambda: _https_ok(f"https://127.0.0.1:{port}/health", certs / "ca.crt"), 60, "the SuperLink")
        assert superlink.poll() is None
        for k in range(3):
            assert _flwr(tmp_path, "supernode", "register", str(certs / f"supernode-{k}.pub"), "fed").returncode == 0
        nodes = {k: supernode(k) for k in range(3)}
        run_config = subprocess.run(
            [str(BIN / "perfit"), "config", "--flwr", *cli_args(fields), "--out", str(out)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "fed", "--format", "json", "--run-config", run_config],
            capture_output=True, text=True, cwd=REPO, env=_env(tmp_path, "cli-home"), timeout=120,
        )  # fmt: skip
        run_id = json.loads(submitted.stdout)["run-id"]
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, 300, "round 1")
        os.killpg(nodes[victim].pid, signal.SIGKILL)  # the SuperNode and its SuperExec / ClientApp children
        nodes[victim].wait()
        # the SuperLink refuses a node's key while it still counts the node online (until its heartbeat lapses)
        _wait_for(lambda: _online(tmp_path) == 2, 300, "the SuperLink to see the node gone")
        nodes[victim] = supernode(victim)

        def finished() -> bool:
            listed = _flwr(tmp_path, "list", "fed", "--run-id", str(run_id), "--format", "json")
            return json.loads(listed.stdout)["runs"][0]["status"].startswith("finished")

        _wait_for(finished, 420, "the run to finish")
        listed = _flwr(tmp_path, "list", "fed", "--run-id", str(run_id), "--format", "json")
        assert json.loads(listed.stdout)["runs"][0]["status"].startswith("finished:completed"), listed.stdout
    finally:
        _stop_all(tmp_path)
    assert _ours(tmp_path) == []
    rounds = [json.loads(line) for line in metrics.read_text().splitlines() if not json.loads(line).get("final")]
    assert [r["clients"] for r in rounds] == _sampled(seed, 3, 2, 3)  # the victim missed no round it was in
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_updates"] == []
    reference = run_simulation(Config(**{**fields, "out": str(tmp_path / "uninterrupted")}), num_cpus=2)
    assert all(value > 1 for value in reference["per_client_ppl"].values())  # every client measured
    for client, value in reference["per_client_ppl"].items():
        assert summary["per_client_ppl"][client] == pytest.approx(value, rel=1e-4), client
    for k in range(3):  # each node keeps its B and, at the end, its owner's adapter in PEFT format
        (kept,) = (state / f"node-{k}").glob("run-*")
        versions = {int(path.stem.split("@")[1]) for path in kept.glob("personal@*.safetensors")}
        assert versions and versions <= {1, 2, 3}  # B by the round that trained it
        assert (kept / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((kept / "adapter" / "adapter_config.json").read_text())["r"] == 4
