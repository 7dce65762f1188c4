"""Flower ClientApp: thin glue over `perfit.task.ClientTask`.

Messages (the server sends the resolved run config with every message, so a client needs no run
config of its own):
- `query`: which client (partition) this node is.
- any message may carry `registered`: the client's mask as the server registered it (sent after a
  server resume, when the node's state is gone); the node keeps it instead of searching again.
- `query.search`: run Alg. 1 once, keep the mask in the node's state, send it bit-packed.
- `train`: values at the mask positions in, local masked training, values at the mask positions out.
- `evaluate`: personalized NLL of the received adapter on the client's held-out rows.

Node config (`flower-supernode --node-config`; simulation sets the first two): `partition-id` is the
client this node is, `num-partitions` (optional) must equal the run's num_clients, and `data` / `model`
(optional) point at this machine's copy of the run's dataset / base model when its path differs here.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from perfit.config import from_mapping
from perfit.masks import decode, encode, gather, scatter
from perfit.task import ClientTask, client_task

app = ClientApp()
LOCAL_PATHS = ("data", "model")  # node config keys that override the run config on this node


def _client_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _task(msg: Message, context: Context) -> ClientTask:
    settings = dict(msg.content["run"])
    settings.update({key: context.node_config[key] for key in LOCAL_PATHS if key in context.node_config})
    partitions = context.node_config.get("num-partitions", settings["num_clients"])
    if int(partitions) != int(settings["num_clients"]):
        raise ValueError(f"node config num-partitions={partitions}, but the run has {settings['num_clients']} clients")
    return client_task(from_mapping(settings))


def _mask(task: ClientTask, client: int, context: Context, msg: Message | None = None) -> torch.Tensor:
    """The client's static mask: all ones for FIT, else searched once and kept in the node state
    (or, after a server resume, the registered mask the server sends back)."""
    if task.config.method == "fit":
        return torch.ones(task.layout.size, dtype=torch.bool)
    if msg is not None and "registered" in msg.content:
        context.state["perfit"] = ArrayRecord({"mask": msg.content["registered"]["mask"]})
    if "perfit" not in context.state:
        mask = task.search(client)
        context.state["perfit"] = ArrayRecord({"mask": Array(encode(mask))})
    return decode(context.state["perfit"]["mask"].numpy(), task.layout.size)


def _reply(msg: Message, metrics: dict, **arrays: np.ndarray) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays:
        content["arrays"] = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return Message(content, reply_to=msg)


def _received(msg: Message, mask: torch.Tensor) -> torch.Tensor:
    values = torch.from_numpy(msg.content["arrays"]["values"].numpy().copy())
    return scatter(values, mask)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"client": _client_id(context)})}), reply_to=msg)


@app.query("search")
def search(msg: Message, context: Context) -> Message:
    client = _client_id(context)
    task = _task(msg, context)
    state_before = "perfit" in context.state
    mask = _mask(task, client, context)
    return _reply(msg, {"client": client, "cached": int(state_before)}, mask=encode(mask))


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = _client_id(context)
    task = _task(msg, context)
    mask = _mask(task, client, context, msg)
    result = task.train(client, _received(msg, mask), mask, int(msg.content["round"]["round"]))
    values = gather(result.flat, mask).numpy().astype(np.float32)
    metrics = {"client": client, "examples": result.examples, "train_loss": result.loss, "steps": result.steps}
    return _reply(msg, metrics, values=values)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client = _client_id(context)
    task = _task(msg, context)
    mask = _mask(task, client, context, msg)
    total_nll, tokens = task.evaluate(client, _received(msg, mask))
    return _reply(msg, {"client": client, "nll": total_nll, "tokens": tokens})
