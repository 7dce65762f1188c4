"""The node's long-lived worker (`federation/node_worker.py`): a Deployment Engine node's ClientApp,
a fresh process per message, hands each message to it. Its replies are the handlers' own; the
node's state travels back with each reply (the worker is a cache, not the node's memory); a dead
worker is replaced; it exits with the SuperNode it watches; a node's errors still reach the server
with their file, line and field."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from perfit.config import Config
from perfit.federation import client_app, handlers, node_worker
from perfit.federation.node_worker import alive

from ..tiny import TINY_RUN


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def _worker_pid(state_dir) -> int:
    return json.loads((state_dir / node_worker.WORKER_FILE).read_text())["pid"]


@pytest.fixture
def supernode(monkeypatch):
    """A stand-in SuperNode for the worker to watch (the worker watches its ClientApp's parent)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    monkeypatch.setattr(node_worker.os, "getppid", lambda: stand_in.pid)
    yield stand_in
    stand_in.kill()
    stand_in.wait()


def _node(owner_file, state_dir) -> Context:
    node_config = {"data": str(owner_file), "name": "acme", "state-dir": str(state_dir)}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(config: Config, kind: str = MessageType.QUERY, **step) -> Message:
    content = RecordDict({"run": ConfigRecord(config.to_dict())})
    if step:
        content["round"] = ConfigRecord(step)
    return Message(content, dst_node_id=7, message_type=kind)


def test_the_worker_answers_as_the_process_would_and_outlives_messages(tiny_model, owners_dir, tmp_path, supernode):
    config = Config(**{**TINY_RUN, "method": "perfit", "split": "owner", "num_clients": 1, "clients_per_round": 1})
    config.model, config.data = str(tiny_model), str(owners_dir)
    owner_file, state_dir = owners_dir / "acme.jsonl", tmp_path / "state"
    search = f"{MessageType.QUERY}.search"

    here = handlers.search(_message(config, search, client=0), _node(owner_file, tmp_path / "here"))
    node = _node(owner_file, state_dir)
    info = client_app.identify(_message(config), node)  # starts the worker
    assert dict(info.content["info"])["train_rows"] == 32  # 80 % of acme's 40 rows
    first = _worker_pid(state_dir)
    assert first != os.getpid() and alive(first)

    there = client_app.search(_message(config, search, client=0), node)
    mask = there.content["arrays"]["mask"].numpy()
    np.testing.assert_array_equal(mask, here.content["arrays"]["mask"].numpy())
    assert "mask" in node.state  # the node's state came back with the reply
    np.testing.assert_array_equal(node.state["mask"]["value"].numpy(), mask)
    assert _worker_pid(state_dir) == first  # one worker for every message

    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    again = client_app.search(_message(config, search, client=0), node)  # a new worker takes over
    np.testing.assert_array_equal(again.content["arrays"]["mask"].numpy(), mask)
    assert dict(again.content["metrics"])["cached"] == 1  # the mask came with the node's state
    second = _worker_pid(state_dir)
    assert second != first

    supernode.kill()
    assert _wait_gone(second), "the worker outlived the SuperNode it watches"
    assert not (state_dir / node_worker.WORKER_FILE).exists()


def test_a_node_error_reaches_the_server_through_the_worker(tiny_model, tmp_path, supernode):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "ok", "response": "ok"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    config = Config(**{**TINY_RUN, "split": "owner", "num_clients": 1, "clients_per_round": 1})
    config.model, config.data = str(tiny_model), str(bad)
    state_dir = tmp_path / "state"
    with pytest.raises(ValueError, match="bad.jsonl:2: field 'response' is missing"):
        client_app.identify(_message(config), _node(bad, state_dir))
    worker = _worker_pid(state_dir)
    assert alive(worker)  # a bad message does not take the worker down
    supernode.kill()
    assert _wait_gone(worker)


def test_worker_0_runs_the_message_in_the_clientapp_process(tiny_model, owners_dir, tmp_path, supernode):
    config = Config(**{**TINY_RUN, "split": "owner", "num_clients": 1, "clients_per_round": 1})
    config.model, config.data = str(tiny_model), str(owners_dir)
    node = _node(owners_dir / "acme.jsonl", tmp_path / "state")
    node.node_config["worker"] = "0"
    info = client_app.identify(_message(config), node)
    assert dict(info.content["info"])["name"] == "acme"
    assert not (tmp_path / "state" / node_worker.WORKER_FILE).exists()


def test_an_oserror_the_handler_raises_is_the_node_s_error_not_a_dead_worker(owners_dir, tmp_path, supernode):
    """A handler's OSError (here: no base model at the node's path) reaches the server as the node's
    error; the worker that raised it is not taken for dead, so no second worker is started."""
    config = Config(**{**TINY_RUN, "method": "perfit", "split": "owner", "num_clients": 1, "clients_per_round": 1})
    config.model, config.data = str(tmp_path / "no-model-here"), str(owners_dir)
    state_dir = tmp_path / "state"
    node = _node(owners_dir / "acme.jsonl", state_dir)
    client_app.identify(_message(config), node)  # starts the worker (identify loads no weights)
    worker = _worker_pid(state_dir)
    with pytest.raises(OSError, match="no-model-here"):
        client_app.search(_message(config, f"{MessageType.QUERY}.search", client=0), node)
    assert _worker_pid(state_dir) == worker and alive(worker)
    supernode.kill()
    assert _wait_gone(worker)
