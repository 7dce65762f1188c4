"""What a node keeps on its own machine (`federation.node_store`, `handlers._write_adapter`): values that
outlive the process, in a folder only the node's user can read, an adapter replaced whole."""

import json
import stat
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Context, RecordDict

from perfit.config import Config
from perfit.federation.handlers import _write_adapter
from perfit.federation.node_store import NodeStore

from .test_baselines import LAYOUT


def _context(state_dir) -> Context:
    return Context(run_id=1, node_id=1, node_config={"state-dir": str(state_dir)}, state=RecordDict(), run_config={})


def test_kept_values_outlive_the_process_in_a_folder_only_the_node_user_reads(tmp_path):
    config = Config(method="fedsa")
    store = NodeStore(_context(tmp_path / "state"), config)
    store.put("personal", np.arange(4, dtype=np.float32))
    restarted = NodeStore(_context(tmp_path / "state"), config)  # a new process: its memory is empty
    assert restarted.get("personal").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700  # FedSA's B is the owner's alone
    assert [p.name for p in store.directory.iterdir()] == ["personal.safetensors"]  # no staging file left
    other = NodeStore(_context(tmp_path / "state"), config.replace(lr=1e-2))  # another run: its own folder
    assert other.get("personal") is None
    first = NodeStore(_context(tmp_path / "state"), config, nonce="a1")
    first.put("personal", np.ones(2, dtype=np.float32))
    assert NodeStore(_context(tmp_path / "state"), config, nonce="a1").get("personal").tolist() == [1.0, 1.0]
    again = NodeStore(_context(tmp_path / "state"), config, nonce="b2")  # the same config started afresh
    assert again.get("personal") is None  # does not take over the finished run's B


def test_the_final_adapter_is_replaced_whole(tmp_path):
    store = NodeStore(_context(tmp_path / "state"), Config())
    store.directory.mkdir(parents=True)
    task = SimpleNamespace(layout=LAYOUT, config=Config(), model_path="base")
    _write_adapter(store, task, torch.zeros(LAYOUT.size))
    _write_adapter(store, task, torch.ones(LAYOUT.size))  # a later run's end: the first adapter replaced
    assert sorted(p.name for p in store.directory.iterdir()) == ["adapter"]  # nothing staged left beside it
    from safetensors.torch import load_file

    tensors = load_file(str(store.directory / "adapter" / "adapter_model.safetensors"))
    assert all(bool((t == 1).all()) for t in tensors.values())
    assert json.loads((store.directory / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_kept_values_are_versioned_by_round_and_pruned_below_the_one_the_server_names(tmp_path):
    """A node keeps each round's values (FedSA-LoRA's B) as a version, so that a round the server reruns
    after a resume starts from the version the server's checkpoint names, not from a newer one."""
    older = NodeStore(_context(tmp_path / "old"), Config(method="fedsa"), nonce="a1")
    older.put("personal", np.full(2, 1.0, dtype=np.float32))  # kept unversioned, by an older perfit
    assert older.get_version("personal").tolist() == [1.0, 1.0]  # what an older server's resume continues from
    store = NodeStore(_context(tmp_path / "state"), Config(method="fedsa"), nonce="a1")
    assert store.get_version("personal") is None and store.versions("personal") == []
    store.put_version("personal", np.full(2, 3.0, dtype=np.float32), 3, keep_from=0)
    store.put_version("personal", np.full(2, 7.0, dtype=np.float32), 7, keep_from=3)  # round 7 started from 3
    assert store.versions("personal") == [3, 7]  # 3 stays: a rerun of round 7 needs it
    restarted = NodeStore(_context(tmp_path / "state"), Config(method="fedsa"), nonce="a1")  # from disk
    assert restarted.get_version("personal", 3).tolist() == [3.0, 3.0]
    assert restarted.get_version("personal").tolist() == [7.0, 7.0]  # the newest, for an older server
    assert restarted.get_version("personal", 5) is None  # never kept: the node says so, it does not guess
    restarted.put_version("personal", np.full(2, 9.0, dtype=np.float32), 9, keep_from=7)
    assert restarted.versions("personal") == [7, 9]  # 3 is below what the server can still ask for
    assert sorted(p.name for p in restarted.directory.iterdir()) == ["personal@7.safetensors", "personal@9.safetensors"]
    restarted.put_version("personal", np.zeros(2, dtype=np.float32), 10)  # an older server: the newest only
    assert restarted.versions("personal") == [10]


def test_a_node_continues_from_the_version_the_server_names_and_says_when_it_lost_it(tmp_path):
    """`handlers._start`: the kept values of the round the server names (not the newest), none before
    a client's first round, and KEPT_LOST where the node no longer holds them (its state-dir emptied):
    a B reset to its initial value is never trained on in silence."""
    import pytest
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from perfit.federation.handlers import _start
    from perfit.federation.node_store import KEPT_LOST

    store = NodeStore(_context(tmp_path / "state"), Config(method="fedsa"), nonce="a1")
    for version in (2, 5):
        store.put_version("personal", np.full(4, float(version), dtype=np.float32), version)
    shared = torch.tensor([True, True, False, False, False, False])  # received: 2; kept on the node: 2
    task = SimpleNamespace(
        shared=shared, starting_point=lambda received, kept: received if kept is None else received + kept
    )
    mask = torch.tensor([True, False, True, True, False, True])

    def start(kept_round):
        step = {"client": 3} if kept_round is None else {"client": 3, "kept_round": kept_round}
        content = RecordDict(
            {"arrays": ArrayRecord({"values": Array(np.ones(1, dtype=np.float32))}), "round": ConfigRecord(step)}
        )
        return _start(SimpleNamespace(content=content), store, task, mask).tolist()  # what it reads of a message

    assert start(5) == [6.0, 0.0, 5.0, 5.0, 0.0, 5.0]  # the received value, and the kept one at every mask position
    store.put_version("personal", np.full(4, 7.0, dtype=np.float32), 7, keep_from=5)  # a round the server never counted
    assert start(5) == [6.0, 0.0, 5.0, 5.0, 0.0, 5.0]  # the server's version, not the newest
    assert start(None) == [8.0, 0.0, 7.0, 7.0, 0.0, 7.0]  # an older server names none: the newest
    assert start(0) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # before its first round: nothing kept
    with pytest.raises(RuntimeError, match=f"{KEPT_LOST}: client 3's node holds no values kept after round 2"):
        start(2)  # pruned (below 5): the node says so


def test_a_field_added_later_keeps_the_key_of_a_run_started_before_it_at_its_default():
    """A node upgraded in the middle of a run (or resuming one) must find what it kept: `trim` at its
    default leaves the key as perfit computed it before the field existed; set, it names another run."""
    import hashlib

    from perfit.config import RESULT_NEUTRAL
    from perfit.federation.node_store import run_key

    config = Config(method="fedsa", lr=1e-3)
    before = {
        k: v for k, v in config.to_dict().items() if k not in (*RESULT_NEUTRAL, "data", "model", "cache_dir", "trim")
    }
    assert run_key(config) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert run_key(config.replace(trim=1)) != run_key(config)
