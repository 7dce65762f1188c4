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
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from perfit.federation import node_worker
from perfit.federation.node_store import STATE_DIR

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


class KeepingNodes(ClientApp):
    """A ClientApp (perfit's, or a test's) whose simulated nodes each keep their state on disk, in
    `<nodes>/client-<partition-id>/`, as a Deployment Engine node with a `state-dir` does, so that what
    they keep outlives the simulation's process. The messages run in the simulation's own worker
    processes (`worker=0`)."""

    def __init__(self, inner: ClientApp, nodes: str) -> None:
        super().__init__()
        self.inner, self.nodes = inner, nodes

    def __call__(self, message: Message, context: Context) -> Message:
        node = f"client-{context.node_config['partition-id']}"
        context.node_config.update({STATE_DIR: str(Path(self.nodes) / node), "worker": 0})
        return self.inner(message, context)
