"""PerFIT on Flower's Deployment Engine (a SuperLink and SuperNodes, not simulation), secured: TLS on
every connection and SuperNode authentication, through the scripts in scripts/deploy/. Everything binds
to 127.0.0.1, lives under tmp_path (every process gets FLWR_HOME there, which is how the tests find and
stop whatever they started) and is stopped before the test ends."""

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Context, RecordDict

from perfit.config import Config
from perfit.federation import handlers

from ..conftest import OWNER_SIZES
from ..tiny import TINY_RUN, cli_args

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "scripts" / "deploy"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not (shutil.which("openssl") and shutil.which("ssh-keygen")),
    reason="needs Linux (/proc), openssl and ssh-keygen",
)


def _env(tmp_path: Path, home: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BIN": str(BIN),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / home),
        "FLWR_TELEMETRY_ENABLED": "0",
        **extra,
    }


def _ours(tmp_path: Path) -> list[int]:
    """Live processes started under this test: their environment has FLWR_HOME below tmp_path."""
    marker = f"FLWR_HOME={tmp_path}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes() and (entry / "stat").read_text().split()[2] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop_all(tmp_path: Path, grace_seconds: float = 10.0) -> None:
    """SIGTERM every process of this test, SIGKILL what is left after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _ours(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_seconds
        while _ours(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)


def _wait_gone(tmp_path: Path, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _ours(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _https_ok(url: str, ca: Path) -> bool:
    try:
        urllib.request.urlopen(url, context=ssl.create_default_context(cafile=str(ca)), timeout=2)
        return True
    except OSError:
        return False


def _flwr(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args], env=_env(tmp_path, "cli-home"), capture_output=True, text=True, timeout=60
    )


def _local_federation(tmp_path: Path, args: list[str], env: dict[str, str]) -> tuple[int, str, list[int]]:
    """Run local_federation.sh to its end: (exit code, its output, processes it left running)."""
    driver = _start([str(DEPLOY / "local_federation.sh"), *args], tmp_path / "driver.log", env)
    try:
        driver.wait(timeout=600)
        left = _wait_gone(tmp_path)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        _stop_all(tmp_path)
    return driver.returncode, (tmp_path / "driver.log").read_text(), left


def test_node_config_points_at_local_copies(tiny_model, small_data, tmp_path):
    """A SuperNode's `data`/`model` node config override the run's paths; a wrong num-partitions is refused."""
    copy = tmp_path / "owner" / "dolly.jsonl"
    copy.parent.mkdir()
    shutil.copy(small_data, copy)
    config = Config(num_clients=2, clients_per_round=2, data="/elsewhere/dolly.jsonl", model=str(tiny_model))
    msg = SimpleNamespace(content={"run": config.to_dict()})  # a Message needs a running Flower task

    def context(**node_config) -> Context:
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    task = handlers._task(msg, context(**{"partition-id": 1, "num-partitions": 2, "data": str(copy)}))
    assert task.config.data == str(copy)
    assert len(task.rows) == len(small_data.read_text().splitlines())
    with pytest.raises(ValueError, match="num-partitions=3"):
        handlers._task(msg, context(**{"partition-id": 1, "num-partitions": 3}))


def test_two_rounds_on_deployment_engine(tiny_model, small_data, tmp_path):
    """local_federation.sh: CA and keys, TLS SuperLink with node auth, 2 registered SuperNodes, 2 rounds."""
    flags = {**TINY_RUN, "num_clients": 2, "clients_per_round": 2, "rounds": 2, "seed": 3}
    args = cli_args({**flags, "model": tiny_model, "data": small_data})
    work, out = tmp_path / "deploy", tmp_path / "out"
    env = _env(tmp_path, "cli-home", DEPLOY_DIR=str(work))
    returncode, output, left = _local_federation(tmp_path, [*args, "--out", str(out)], env)
    assert returncode == 0, output[-4000:]
    assert left == [], "local_federation.sh left processes running"
    assert "finished:completed" in output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_client_ppl"]) == {"0", "1"}
    assert all(value > 1 for value in summary["per_client_ppl"].values())
    assert summary["rejected_updates"] == []
    superlink_log = (work / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log  # TLS, loopback only
    assert superlink_log.count('/v1/fleet/activate-node HTTP/1.1" 200') == 2  # both registered nodes


def test_data_owners_on_deployment_engine(tiny_model, owners_dir, tmp_path):
    """Three owners, each SuperNode with its own private file (40 / 60 / 120 rows; one without
    `category`, one in Alpaca's fields), `split=owner`, 2 rounds of PerFIT over TLS with node
    authentication, all three a round with the trimmed mean (`trim` 1, what docs/deployment.md
    advises owners who do not trust each other; a field older nodes never knew, sent since it is
    set). The run config's `data` names no file, and its `model` a directory holding only the
    model's config.json: the server side has no path to any data and no weights (the nodes have the
    model's weights at their own path, from their node config). The SuperLink serves HTTPS on
    127.0.0.1 only and activates exactly the registered nodes; the script leaves nothing running."""
    flags = {**TINY_RUN, "split": "owner", "num_clients": 3, "clients_per_round": 3, "rounds": 2, "seed": 1, "trim": 1}
    nowhere, config_only = tmp_path / "no-data-on-the-server", tmp_path / "config-only-model"
    config_only.mkdir()
    shutil.copy(tiny_model / "config.json", config_only / "config.json")
    args = cli_args({**flags, "model": config_only, "data": nowhere})
    work, out = tmp_path / "deploy", tmp_path / "out"
    env = _env(
        tmp_path, "cli-home", DEPLOY_DIR=str(work), PERFIT_OWNERS_DIR=str(owners_dir), PERFIT_MODEL=str(tiny_model)
    )
    returncode, output, left = _local_federation(tmp_path, [*args, "--out", str(out)], env)
    assert returncode == 0, output[-4000:]
    assert left == [] and "finished:completed" in output
    assert not nowhere.exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_names"] == {"0": "acme", "1": "globex", "2": "initech"}
    assert set(summary["per_client_ppl"]) == {"0", "1", "2"} and summary["rejected_updates"] == []
    assert all(value > 1 for value in summary["per_client_ppl"].values())
    partitions = json.loads((out / "partitions.json").read_text())
    for client, (name, rows) in enumerate(OWNER_SIZES.items()):  # 80/20 of each owner's own file, counts only
        assert partitions[str(client)] == {
            "name": name, "train_rows": rows - rows // 5, "eval_rows": rows // 5, "held_out": False
        }  # fmt: skip
    superlink_log = (work / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log  # TLS, loopback only
    assert superlink_log.count('/v1/fleet/activate-node HTTP/1.1" 200') == len(OWNER_SIZES)  # the registered nodes
    assert str(owners_dir) not in (out / "config.toml").read_text()
    assert "trim = 1" in (out / "config.toml").read_text().splitlines()
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json"]  # the server read no weights
    assert summary["model"] == str(tiny_model)  # the nodes' base model, as they found it
    for name in OWNER_SIZES:  # each owner leaves with their adapter, on their own node, served by its worker
        assert len(list((work / "state" / name).glob("run-*/adapter/adapter_model.safetensors"))) == 1
        assert (work / "state" / name / "worker.log").is_file()


def test_unregistered_and_plaintext_clients_are_refused(tmp_path):
    """Only registered keys join, and only over TLS verified against the federation's CA."""
    certs, other = tmp_path / "certs", tmp_path / "other-ca"
    for directory, nodes in ((certs, "2"), (other, "0")):
        subprocess.run([str(DEPLOY / "make_certs.sh"), str(directory), nodes], check=True, capture_output=True)
    port, *node_ports = _free_ports(5)
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n\n'
        f'[superlink.plaintext]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )

    def supernode(key: str, partition: int, *flags: str, ca: Path = certs) -> list[str]:
        script = [str(DEPLOY / "supernode.sh"), f"127.0.0.1:{port}", str(ca / "ca.crt"), str(certs / key)]
        return [*script, str(partition), "2", *flags]

    try:
        superlink = _start(
            [str(DEPLOY / "superlink.sh"), str(certs)],
            tmp_path / "superlink.log",
            _env(tmp_path, "superlink-home", SUPERLINK_PORT=str(port)),
        )
        deadline = time.monotonic() + 60
        while not _https_ok(f"https://127.0.0.1:{port}/health", certs / "ca.crt"):
            assert superlink.poll() is None and time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()
            time.sleep(0.2)
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        registered = _flwr(tmp_path, "supernode", "register", str(certs / "supernode-0.pub"), "secure")
        assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered.stdout

        member = _start(
            supernode("supernode-0", 0),
            tmp_path / "member.log",
            _env(tmp_path, "member-home", SUPERNODE_PORT=str(node_ports[0])),
        )
        retries = ("--max-retries", "2", "--max-wait-time", "5")
        refused = {
            "unregistered": supernode("supernode-1", 1, *retries),
            "wrong-ca": supernode("supernode-0", 0, *retries, ca=other),
            "plaintext": [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--node-config",
                "partition-id=1 num-partitions=2",
                "--port",
                str(node_ports[3]),
                *retries,
            ],
        }
        attempts = {  # logs, not pipes: a SuperNode's SuperExec child would hold a pipe open
            name: _start(
                command,
                tmp_path / f"{name}.log",
                _env(tmp_path, f"{name}-home", SUPERNODE_PORT=str(node_ports[1 + index])),
            )
            for index, (name, command) in enumerate(refused.items())
        }
        codes = {name: attempt.wait(timeout=90) for name, attempt in attempts.items()}
        results = {name: ((tmp_path / f"{name}.log").read_text(), code) for name, code in codes.items()}
        for name, (output, code) in results.items():
            assert code != 0, f"{name} SuperNode was not refused:\n{output[-2000:]}"
            assert "Failed to initialize the connection to the SuperLink" in output, output[-2000:]
        assert "Failed to activate SuperNode" in results["unregistered"][0]
        assert "CERTIFICATE_VERIFY_FAILED" in results["wrong-ca"][0]
        assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()

        plaintext_cli = _flwr(tmp_path, "list", "plaintext", "--format", "json")
        assert json.loads(plaintext_cli.stdout)["success"] is False, plaintext_cli.stdout  # no answer over HTTP

        deadline = time.monotonic() + 60
        while True:  # the registered node joins; the refused ones never became nodes a run could use
            listed = _flwr(tmp_path, "supernode", "list", "secure", "--format", "json")
            nodes = json.loads(listed.stdout)["nodes"]
            if [node["status"] for node in nodes] == ["online"]:
                break
            assert member.poll() is None and time.monotonic() < deadline, (tmp_path / "member.log").read_text()
            time.sleep(0.5)
    finally:
        _stop_all(tmp_path)
    assert _ours(tmp_path) == []
