"""A train round's replies on the server, for `Federation` (`federation.server_app`), which it is
mixed into: each reply checked (`validation.update_problem`) and rejected or accepted, the accepted
changes bounded against the round's median (`core.robust`), then Eq. 6, or its trimmed mean
(`core.aggregate`), into the global adapter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Message, MessageType

from perfit.config import Config
from perfit.core.aggregate import TrimmedMean, round_aggregator
from perfit.core.layout import Layout
from perfit.core.masks import PackedMasks, gather, scatter
from perfit.core.methods import FixedMasks, lora_update_norm
from perfit.core.robust import bound_changes, change_norms
from perfit.federation.exchange import array_bytes, reply_metrics
from perfit.federation.roster import Roster
from perfit.federation.validation import update_problem

log = logging.getLogger("perfit")
CLIENT_SECONDS = ("startup_seconds", "setup_seconds", "compute_seconds")
"""Where a train message's time went on its client, as the client reports it (metrics.jsonl)."""

Accepted = dict[int, tuple[torch.Tensor, torch.Tensor, int]]
"""A round's accepted updates by client: (its mask at the shared positions, its values there, its
example count)."""


ROUND_RECORD = ("change_norms", "update_bound", "bounded", "weight_capped", "trimmed", "client_seconds")
"""What a train round adds to its metrics.jsonl line, where it has them: each accepted change's norm,
the round's norm bound, the clients scaled to it and those whose weight was capped, and where each
client's time went."""


class RoundUpdates:
    """Training a round's clients and aggregating their replies, for `Federation`: the state it reads
    is the run's (set up there); sending is `Federation._send`'s, rejecting `NodeExchange`'s."""

    config: Config
    layout: Layout
    masks: PackedMasks | FixedMasks
    shared: torch.Tensor  # the positions whose values travel (`core.methods.shared_positions`)
    roster: Roster
    global_flat: torch.Tensor
    weight_cap: float
    kept_rounds: dict[int, int] | None
    _send: Callable[..., tuple[dict[int, Message], int]]
    _reject: Callable[[int, str], None]
    _malformed: Callable[[int, Exception], None]

    def _train_round(self, sampled: list[int], round_number: int) -> dict[str, Any]:
        """Send, check every reply, bound the accepted changes, then Eq. 6 (or its trimmed mean)."""
        replies, bytes_down = self._send(sampled, MessageType.TRAIN, round_number)
        if self.kept_rounds is not None:  # each node that replied kept what it trained, accepted here or not
            self.kept_rounds.update(dict.fromkeys(replies, round_number))
        accepted, losses, bytes_up, timing = {}, [], 0, {}
        for client, reply in replies.items():
            try:
                payload_bytes = array_bytes(reply.content["arrays"]) if "arrays" in reply.content else 0
                bytes_up += payload_bytes
                self._read_update(client, reply, payload_bytes, accepted, timing, losses)
            except Exception as err:  # a reply of the wrong record types or shapes: that client's, not the run's
                self._malformed(client, err)
        bounds = self._bound(accepted)
        updates, capped = round_aggregator(self.config.aggregation_rule, self.layout.size, self.config.trim), {}
        by_examples = self.config.method != "hetlora"  # HetLoRA weighs by ||B A||_F, not by a claim
        for client, (mask, values, examples) in accepted.items():
            dense = scatter(values, mask)
            if by_examples and examples > self.weight_cap:
                log.warning("client %d: weight of %d examples capped at %.4g", client, examples, self.weight_cap)
                capped[str(client)] = examples
            updates.add(mask, dense, self._weight(dense, examples))
        if accepted and by_examples and self.config.update_bound > 0:
            bounds["weight_capped"] = capped
        needed = math.ceil(self.config.min_replies * len(sampled))
        counted = updates.count > 0 and updates.count >= needed
        if counted:
            self.global_flat = updates.result(self.global_flat)
            if isinstance(updates, TrimmedMean):  # each client's share left out: near 1, far from the others
                bounds["trimmed"] = dict(zip(map(str, accepted), updates.dropped_shares, strict=True))
        else:
            log.warning("round %d not counted: %d accepted updates, %d needed", round_number, updates.count, needed)
        weight = sum(w for _, w in losses)
        loss = sum(v * w for v, w in losses) / weight if weight else float("nan")
        return {
            "loss": loss,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "accepted": updates.count,
            "counted": counted,
            "client_seconds": timing,
            **bounds,
        }

    def _read_update(
        self,
        client: int,
        reply: Message,
        payload_bytes: int,
        accepted: Accepted,
        timing: dict[str, dict[str, float]],
        losses: list[tuple[float, float]],
    ) -> None:
        """Check one train reply (`validation.update_problem`): rejected and logged, or added to
        `accepted` (mask, values, examples), with its timing and its loss."""
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()} if payload_bytes else {}
        metrics = reply_metrics(reply)
        registered = self.masks.packed(client) if "mask" in arrays else None  # only a reply sending one
        mask = self.masks[client] & self.shared
        train_rows = self.roster.train_rows(client)
        problem = update_problem(client, arrays, metrics, int(mask.sum()), registered, payload_bytes, train_rows)
        if problem:
            self._reject(client, problem)
            return
        if int(metrics["examples"]) == 0:
            return  # a client without train rows has nothing to contribute
        seconds = {k: float(metrics[k]) for k in CLIENT_SECONDS if k in metrics}
        loss = (float(metrics["train_loss"]), min(float(metrics["examples"]), self.weight_cap))
        accepted[client] = (mask, torch.from_numpy(arrays["values"].copy()), int(metrics["examples"]))
        timing[str(client)] = seconds
        losses.append(loss)

    def _bound(self, accepted: Accepted) -> dict[str, Any]:
        """Scale each accepted change from what its client received down to at most `update_bound` x
        the round's median change norm (`core.robust`), in place; the norms, the bound and the
        clients bounded, for the round's metrics."""
        if not accepted:
            return {}
        clients = list(accepted)
        received = [gather(self.global_flat, accepted[c][0]).float() for c in clients]
        returned = [accepted[c][1] for c in clients]
        norms = change_norms(received, returned)
        record: dict[str, Any] = {"change_norms": {str(c): n for c, n in zip(clients, norms, strict=True)}}
        if self.config.update_bound > 0:
            bounded, scales, bound = bound_changes(received, returned, self.config.update_bound)
            for client, values, scale in zip(clients, bounded, scales, strict=True):
                accepted[client] = (accepted[client][0], values, accepted[client][2])
                if scale < 1.0:
                    log.warning("client %d: update scaled by %.3g to the round's bound %.4g", client, scale, bound)
            record["update_bound"] = bound
            record["bounded"] = {str(c): s for c, s in zip(clients, scales, strict=True) if s < 1.0}
        return record

    def _weight(self, dense: torch.Tensor, examples: int) -> float:
        """Aggregation weight: the client's example count, at most the weight cap; HetLoRA's sparsity
        weight ||B A||_F."""
        if self.config.method == "hetlora":
            return max(lora_update_norm(self.layout, dense), 1e-12)
        return float(min(examples, self.weight_cap))
