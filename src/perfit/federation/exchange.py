"""The server's messages to the nodes and the replies it waits for: one of the mixins of the
ServerApp's `Federation` (`federation.server_app`), beside `updates` and `evaluation`.

Every message names the run (its config and nonce), the round and, for a node that keeps values of
its own, the version it continues from; a mask the node may have lost travels with it. `_exchange`
sends and collects replies by client, each as it arrives: a node the SuperLink reports offline (a SuperNode restarting)
is sent the message again until it is back, a node that lost its mask gets it again, one that lost
the values it kept starts them afresh (named in the summary), and every other failed, late or
missing reply is logged and dropped (`rejected_updates`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from perfit.config import Config
from perfit.core.masks import MASK_LOST, PackedMasks, digest
from perfit.core.methods import FixedMasks
from perfit.federation.node_store import KEPT_LOST
from perfit.federation.roster import Roster
from perfit.federation.validation import last_line

log = logging.getLogger("perfit")

NODE_RETURN_SECONDS = 180.0
"""How long a round keeps sending a message whose node the SuperLink reports offline: a SuperNode
that restarts is back well within it (the SuperLink notices a dead node within two of its 30 s
heartbeats, and the node's restart takes seconds); a node gone for good is skipped after it."""

PULL_SECONDS = 3.0
"""How often replies are asked for where the Grid names no interval of its own (`Grid.send_and_receive`
of a Deployment Engine's SuperLink waits as long between its pulls)."""


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays in a payload as Flower serializes them."""
    return record.count_bytes()


def reply_metrics(reply: Message) -> dict[str, Any]:
    """A reply's metrics as a plain dict ({} where it has none)."""
    return dict(reply.content["metrics"]) if "metrics" in reply.content else {}


def _again(message: Message) -> Message:
    """A fresh copy of a sent message (same content, node, type and round) to send once more."""
    metadata = message.metadata
    return Message(
        message.content,
        dst_node_id=metadata.dst_node_id,
        message_type=metadata.message_type,
        group_id=metadata.group_id,
    )


class NodeExchange:
    """Messaging with the nodes, for `Federation`: the state it reads is the run's (set up there)."""

    grid: Grid
    config: Config
    roster: Roster
    masks: PackedMasks | FixedMasks
    confirmed: set[int]  # clients whose node holds its registered mask
    nonce: str
    kept_rounds: dict[int, int] | None
    rejected: list[dict[str, Any]]
    kept_lost: list[dict[str, int]]

    def _message(
        self,
        client: int,
        message_type: str,
        arrays: ArrayRecord | None,
        round_number: int,
        finetune: int = 0,
        final: bool = False,
    ) -> Message:
        step = ConfigRecord(
            {
                "round": round_number,
                "finetune": finetune,
                "client": client,
                "final": int(final),
                "run_nonce": self.nonce,
            }
        )
        if self.kept_rounds is not None:
            step["kept_round"] = self.kept_rounds.get(client, 0)
        if isinstance(self.masks, PackedMasks) and client in self.masks:  # the node checks that it holds this mask
            step["mask_digest"] = digest(self.masks.packed(client))
        content = RecordDict({"run": ConfigRecord(self.config.to_message()), "round": step})
        if arrays is not None:
            content["arrays"] = arrays
        if client in self.masks and client not in self.confirmed:  # after a resume: the node lost its state
            content["registered"] = ArrayRecord({"mask": Array(self.masks.packed(client))})
        node = self.roster.nodes[client]
        return Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_number))

    def _replies(self, messages: list[Message], deadline: float) -> Iterator[Message]:
        """Send `messages`, then yield their replies as they arrive, until all have or `deadline`
        (time.monotonic) passes. Unlike `Grid.send_and_receive`, which returns once the slowest node
        has answered, a caller sees each reply at once (a final evaluation keeps each on disk)."""
        waiting = set(self.grid.push_messages(messages))  # sets each message's id
        pause = float(getattr(self.grid, "pull_interval", PULL_SECONDS))

        def pulled() -> Iterator[Message]:
            while waiting:
                answered = list(self.grid.pull_messages(waiting))
                waiting.difference_update(reply.metadata.reply_to_message_id for reply in answered)
                yield from answered
                if not waiting or time.monotonic() >= deadline:
                    return
                time.sleep(pause)

        return pulled()

    def _exchange(
        self, messages: dict[int, Message], arrived: Callable[[int, Message], None] | None = None
    ) -> dict[int, Message]:
        """Send and collect replies by client, waiting at most `reply_timeout_seconds`; failed,
        late, missing and unexpected replies are logged and dropped. A message the SuperLink
        reports undeliverable because its node is offline (a SuperNode restarting) is sent again
        until the node is back, for at most NODE_RETURN_SECONDS. `arrived(client, reply)` is
        called for each reply without an error as soon as it is pulled."""
        timeout = self.config.reply_timeout_seconds
        deadline = time.monotonic() + timeout
        replies, failed, pending, away_since, resent, restarted = {}, set(), dict(messages), None, set(), set()
        while pending:
            answered = self._replies(list(pending.values()), deadline)
            by_id = {message.metadata.message_id: client for client, message in pending.items()}
            by_node = {message.metadata.dst_node_id: client for client, message in pending.items()}
            offline, lost, forgot = {}, {}, {}
            for reply in answered:
                client = by_id.get(reply.metadata.reply_to_message_id, by_node.get(reply.metadata.src_node_id))
                if client is None:
                    log.warning("reply from unknown node %s ignored", reply.metadata.src_node_id)
                elif reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    offline[client] = pending[client]
                elif reply.has_error() and MASK_LOST in reply.error.reason and client not in resent:
                    lost[client] = pending[client]  # a node that restarted without its state: send it the mask
                elif reply.has_error() and KEPT_LOST in reply.error.reason and client not in restarted:
                    forgot[client] = pending[client]  # its own values are gone: it starts them afresh, named
                elif reply.has_error():
                    failed.add(client)
                    self._reject(client, f"client error: {last_line(reply.error.reason)}")
                else:
                    replies[client] = reply
                    if arrived is not None:
                        arrived(client, reply)
            if offline and away_since is None:
                away_since = time.monotonic()
            if offline and time.monotonic() + 1.0 > min(deadline, away_since + NODE_RETURN_SECONDS):
                for client in sorted(offline):
                    failed.add(client)
                    self._reject(client, "node unavailable (offline)")
                offline = {}
            if not offline and not lost and not forgot:
                break
            if offline:
                log.info("nodes of clients %s offline; sending again while they return", sorted(offline))
                time.sleep(1.0)
            pending = {c: _again(message) for c, message in {**offline, **lost, **forgot}.items()}
            for client in lost:
                log.warning("client %d: its node lost the mask it registered; sending it again", client)
                pending[client].content["registered"] = ArrayRecord({"mask": Array(self.masks.packed(client))})
                resent.add(client)
            for client in forgot:
                self._start_afresh(client, pending[client].content["round"])
                restarted.add(client)
        for client in sorted(set(messages) - set(replies) - failed):
            self._reject(client, f"no reply within {timeout:g} s")
        self.confirmed.update(c for c in replies if c in self.masks)
        return replies

    def _start_afresh(self, client: int, step: ConfigRecord) -> None:
        """A node that no longer holds the values it kept (FedSA-LoRA's B) after the round the message
        names: it is sent the message again to start them from their initial value, and the run's
        summary names it (`kept_lost`), since its client's result is no longer the uninterrupted one."""
        kept = int(step["kept_round"])
        log.warning("client %d: its node lost the values it kept after round %d; it starts them afresh", client, kept)
        self.kept_lost.append({"client": client, "round": int(step["round"]), "kept_round": kept})
        step["kept_round"] = 0

    def _reject(self, client: int, reason: str) -> None:
        log.warning("client %d: update rejected: %s", client, reason)
        self.rejected.append({"client": client, "reason": reason})

    def _malformed(self, client: int, err: Exception) -> None:
        """A reply whose records do not have the types and shapes perfit sends (a hostile or broken
        client): rejected and logged like any bad reply, instead of ending the run."""
        self._reject(client, f"malformed reply ({type(err).__name__}: {err})")
