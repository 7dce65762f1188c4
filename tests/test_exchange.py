"""The server's exchange with the nodes sees each reply as it arrives, not once the slowest node has
answered: a final evaluation keeps every reply on disk at once (`federation.exchange`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from perfit.config import Config
from perfit.federation.exchange import NodeExchange


class _SlowGrid:
    """Each pull returns at most one new reply, in the order sent; `answers` replies in all."""

    pull_interval = 0.0

    def __init__(self, answers: int):
        self.answers, self.pulls, self.sent = answers, 0, []

    def push_messages(self, messages):
        for number, message in enumerate(messages):
            message.metadata.message_id = f"m{number}"
            self.sent.append(message)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [m for m in self.sent[: self.answers] if m.metadata.message_id in set(message_ids)]
        return [_reply(m) for m in ready[:1]]


def _message(node: int):
    return SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=node))


def _reply(message):
    metadata = SimpleNamespace(
        reply_to_message_id=message.metadata.message_id, src_node_id=message.metadata.dst_node_id
    )
    return SimpleNamespace(metadata=metadata, has_error=lambda: False)


def _exchange(grid: _SlowGrid, timeout: float) -> NodeExchange:
    exchange = NodeExchange()
    exchange.grid, exchange.config = grid, Config(reply_timeout_seconds=timeout)
    exchange.confirmed, exchange.masks, exchange.rejected = set(), {}, []
    return exchange


def test_each_reply_is_handed_on_as_it_is_pulled():
    grid = _SlowGrid(answers=3)
    exchange, seen = _exchange(grid, 60.0), []
    replies = exchange._exchange(
        {7: _message(0), 8: _message(1), 9: _message(2)}, lambda c, r: seen.append((c, grid.pulls))
    )
    assert sorted(replies) == [7, 8, 9]
    assert seen == [(7, 1), (8, 2), (9, 3)]  # each at the pull that brought it, before the next one


def test_replies_stop_at_the_deadline_and_a_missing_one_is_rejected():
    grid = _SlowGrid(answers=1)
    exchange = _exchange(grid, 0.3)
    started = time.monotonic()
    replies = exchange._exchange({7: _message(0), 8: _message(1)})
    assert sorted(replies) == [7] and 0.3 <= time.monotonic() - started < 5.0
    assert exchange.rejected == [{"client": 8, "reason": "no reply within 0.3 s"}]
