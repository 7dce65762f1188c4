"""What a node keeps between messages, on its own machine: its client's mask and the values that
never leave it (FedSA-LoRA's B, a `local` or fine-tuned adapter), and at the end of a run the
owner's personalized adapter.

Flower keeps a node's `Context.state` in memory only, so a SuperNode restart loses it. With a
`state-dir` in its node config a node also writes each value to disk, atomically (write a temporary
file, then rename it over the old one: a kill leaves the previous value or the new one, never half
of either), under a folder keyed by the run, and reads it back when its memory has lost it.

Values a run advances each round (FedSA-LoRA's B, a `local` adapter) are kept by version: the round
whose training produced them. The server names, in each message, the round of the client's last
train reply it received (`kept_round`), and the node continues from exactly that version. A server
resumed from its checkpoint reruns the round it stopped in; a node that already trained that round
(and kept a newer version) still starts it from the version the checkpoint knows, so the resumed run
is the uninterrupted one. A node asked for a version it no longer holds (restarted without a
state-dir, its state-dir emptied, or another machine's) says so (KEPT_LOST) instead of training on
from a reset value; the server then tells it to start afresh and names it in the run's summary
(`kept_lost`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from perfit.config import RESULT_NEUTRAL, Config

STATE_DIR = "state-dir"  # the node config key
KEPT_LOST = "perfit: kept values lost"  # a node's error reply: it no longer holds the version asked for


def run_key(config: Config) -> str:
    """A run's identity for its nodes' state: every field that shapes the result (a resumed run,
    with the same config, finds the same state); node-local paths aside."""
    local = (*RESULT_NEUTRAL, "data", "model", "cache_dir")
    fields = {k: v for k, v in config.to_message().items() if k not in local}  # LATER_FIELDS: as before them
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class NodeStore:
    """A node's kept arrays by name: in Flower's node state, and under `<state-dir>/run-<key>/` when
    the node config gives a `state-dir`."""

    def __init__(self, context: Context, config: Config, nonce: str = "") -> None:
        """`nonce`: the run's own id, drawn by the server at a fresh start and kept in its checkpoint, so
        that a resumed run finds its state and a run started afresh with the same config does not
        take over a finished one's (its B, its mask)."""
        self.state = context.state
        state_dir = context.node_config.get(STATE_DIR)
        key = run_key(config) + (f"-{nonce}" if nonce else "")
        self.directory = Path(str(state_dir)).expanduser() / f"run-{key}" if state_dir else None

    def __contains__(self, name: str) -> bool:
        return name in self.state or (self.directory is not None and self._path(name).is_file())

    def versions(self, name: str) -> list[int]:
        """The versions of `name` this node holds (in memory or on disk), in order."""
        prefix = f"{name}@"
        found = {key for key in self.state if key.startswith(prefix)}
        if self.directory is not None and self.directory.is_dir():
            found.update(path.stem for path in self.directory.glob(f"{prefix}*.safetensors"))
        return sorted(int(key.removeprefix(prefix)) for key in found)

    def put_version(self, name: str, value: np.ndarray, version: int, keep_from: int | None = None) -> None:
        """Keep `value` as version `version` of `name`; versions below `keep_from` are dropped (the
        server will never ask for them again), all older ones where `keep_from` is None."""
        self.put(f"{name}@{version}", value)
        for older in self.versions(name):
            if older < (version if keep_from is None else min(keep_from, version)):
                self.drop(f"{name}@{older}")

    def get_version(self, name: str, version: int | None = None) -> np.ndarray | None:
        """Version `version` of `name` (the newest where None); None when the node does not hold it."""
        if version is None:
            held = self.versions(name)
            return self.get(f"{name}@{held[-1]}") if held else self.get(name)  # unversioned: an older perfit's
        return self.get(f"{name}@{version}")

    def drop(self, name: str) -> None:
        if name in self.state:
            del self.state[name]
        if self.directory is not None:
            self._path(name).unlink(missing_ok=True)

    def get(self, name: str) -> np.ndarray | None:
        """The kept array, from memory or (after a restart) from disk; None before it is kept."""
        if name not in self.state and self.directory is not None and self._path(name).is_file():
            from safetensors.numpy import load_file

            self.state[name] = ArrayRecord({"value": Array(load_file(str(self._path(name)))["value"])})
        return self.state[name]["value"].numpy() if name in self.state else None

    def put(self, name: str, value: np.ndarray) -> None:
        self.state[name] = ArrayRecord({"value": Array(value)})
        if self.directory is not None:
            from safetensors.numpy import save_file

            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # the owner's private values: its own
            staging = self.directory / f".{name}.safetensors.tmp"
            save_file({"value": np.ascontiguousarray(value)}, str(staging))
            os.replace(staging, self._path(name))

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"
