"""Flower ClientApp: hands each message to `handlers` (what a node does with it, over
`perfit.client.task.ClientTask`).

On a Deployment Engine node with a `state-dir`, Flower starts this process afresh for every
message, so it imports neither torch nor perfit's client code: it forwards the message to the
node's long-lived worker (`node_worker`), which keeps the model and the tokenised rows between
messages. Elsewhere (a simulation's long-lived worker processes, a node without a `state-dir` or
with `worker=0`) the handlers run here. The messages and the node config are described in
`handlers`."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from perfit.federation import node_worker

app = ClientApp()


def _run(handler: str, msg: Message, context: Context, **kwargs: Any) -> Message:
    state_dir = node_worker.wanted(context)
    if state_dir is not None:
        reply = node_worker.forward(state_dir, handler, msg, context, **kwargs)
        if reply is not None:
            return reply
    from perfit.federation import handlers

    return getattr(handlers, handler)(msg, context, **kwargs)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return _run("identify", msg, context)


@app.query("search")
def search(msg: Message, context: Context) -> Message:
    return _run("search", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _run("train", msg, context, started=time.time(), startup=node_worker.process_age_seconds())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _run("evaluate", msg, context)
