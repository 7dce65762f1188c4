"""Who takes part: the server asks every node which client it is before the first round.

Each node answers from its own data (the server opens none): a research split's node its client id
and the row indices its client holds, an owner's node (`split=owner`) its name and row counts, and
every node the base model it found and its fingerprint. The roster maps client ids to nodes (owners
numbered in the order of their names), holds what partitions.json records, and checks that every
node runs the same weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from perfit.config import Config
from perfit.federation.validation import last_line

NODE_WAIT_SECONDS = 120.0
"""How long the server waits for the run's nodes to connect (simulation nodes register shortly after
start; SuperNodes should be started before the run)."""


class NodesFailed(RuntimeError):
    """The federation could not start: nodes did not answer, or answered with an error (a client's
    bad data file among them: the message names the file, the line and the field)."""


@dataclass
class Roster:
    nodes: dict[int, int] = field(default_factory=dict)  # client id -> node id
    names: dict[int, str] = field(default_factory=dict)  # client id -> owner name (split=owner)
    splits: dict[int, dict[str, Any]] = field(default_factory=dict)  # client id -> its partitions.json entry
    node_models: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (its model path, fingerprint)
    keeps_state: dict[int, bool] = field(default_factory=dict)  # node -> whether its kept values are on disk

    def base_model(self) -> tuple[str, str]:
        """(path, fingerprint) of the base model as the nodes found it; every node must run the same
        weights, whatever path each keeps them at."""
        models = {self.node_models[node] for node in self.nodes.values()}
        if len({fingerprint for _, fingerprint in models}) != 1:
            raise NodesFailed(f"the nodes run different base models: {sorted(models)}")
        return sorted(models)[0]

    def forgetful(self, clients: list[int]) -> list[int]:
        """The clients among `clients` whose node keeps its values in memory only (no state-dir: a
        simulated node, or a SuperNode without one), which a restart or a new run loses."""
        return [c for c in clients if c in self.nodes and not self.keeps_state.get(self.nodes[c], False)]

    def train_rows(self, client: int) -> int:
        """How many train rows `client`'s node said it holds (a research split's distinct row
        indices: a repeated index is no more rows): the most examples an update of it may count
        (`validation.update_problem`), and what the weight cap is taken over."""
        split = self.splits[client]
        return int(split["train_rows"]) if "train_rows" in split else len(set(split["train"]))


def discover(grid: Grid, config: Config) -> Roster:
    """Wait for the run's nodes, ask each which client it is, and build the roster."""
    owners = config.split == "owner"
    needed = list(range(config.num_clients)) if owners else config.participants
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(node_ids := list(grid.get_node_ids())) < len(needed):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {len(needed)} nodes connected")
        time.sleep(0.1)
    content = RecordDict({"run": ConfigRecord(config.to_message())})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    roster, errors, named = Roster(), [], {}
    for reply in grid.send_and_receive(messages, timeout=config.reply_timeout_seconds):  # a node that never answers
        if reply.has_error():
            errors.append(last_line(reply.error.reason))
            continue
        info = reply.content["info"]
        roster.node_models[reply.metadata.src_node_id] = (str(info["model"]), str(info["model_fingerprint"]))
        roster.keeps_state[reply.metadata.src_node_id] = bool(info.get("keeps_state", 0))
        if owners:
            named.setdefault(str(info["name"]), []).append((reply.metadata.src_node_id, info))
            continue
        client = int(info["client"])
        if client in roster.nodes:
            raise NodesFailed(f"two nodes claim client {client} (partition-id): each client is one node")
        roster.nodes[client] = reply.metadata.src_node_id
        rows = reply.content["rows"]
        roster.splits[client] = {part: rows[part].numpy().tolist() for part in ("train", "eval")}
    if owners:
        number_owners(roster, named, config.num_clients)
    missing = set(needed) - set(roster.nodes)
    if missing:
        reasons = f": {'; '.join(sorted(set(errors)))}" if errors else ""
        raise NodesFailed(f"no node answered for clients {sorted(missing)}{reasons}")
    return roster


def number_owners(roster: Roster, named: dict[str, list[tuple[int, Any]]], num_clients: int) -> None:
    """Owners' nodes numbered 0..N-1 in the order of their names (unique, and at most num_clients
    of them); their partitions.json entries: name and row counts, never rows."""
    doubled = sorted(name for name, nodes in named.items() if len(nodes) > 1)
    if doubled:
        raise RuntimeError(f"owner name(s) used by more than one node: {', '.join(doubled)}")
    if len(named) > num_clients:
        raise RuntimeError(f"{len(named)} owners' nodes answered, but the run has {num_clients} clients")
    for client, name in enumerate(sorted(named)):
        node, info = named[name][0]
        roster.nodes[client] = node
        roster.names[client] = name
        counts = {part: int(info[part]) for part in ("train_rows", "eval_rows")}
        roster.splits[client] = {"name": name, **counts}
