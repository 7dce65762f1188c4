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
