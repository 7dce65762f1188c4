"""A ClientApp that behaves like perfit's except for the clients told to misbehave: each fault is
one way a broken or hostile client can answer. Built by a factory so Ray ships the closures (and the
fault table) to the simulation's worker processes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from perfit.federation import client_app as perfit_client

TRAIN_FAULTS = (
    "nan",
    "inf",
    "float64",
    "shape",
    "outside_mask",
    "mask_changed",
    "oversize",
    "impostor",
    "bad_examples",
    "inflated_examples",
    "nan_client",
    "list_seconds",
)


def _corrupt(reply: Message, fault: str, client: int) -> None:
    arrays = reply.content["arrays"]
    values = arrays["values"].numpy().copy()
    metrics = reply.content["metrics"]
    if fault == "nan":
        values[len(values) // 2] = np.nan
    elif fault == "inf":
        values[0] = np.inf
    elif fault == "float64":
        values = values.astype(np.float64)
    elif fault == "shape":
        values = values.reshape(2, -1)
    elif fault == "outside_mask":
        values = np.concatenate([values, np.ones(values.size, dtype=np.float32)])
    elif fault == "mask_changed":
        arrays["mask"] = Array(np.packbits(np.ones(values.size * 2, dtype=np.uint8)))
    elif fault == "oversize":
        arrays["padding"] = Array(np.zeros(2 << 20, dtype=np.uint8))
    elif fault == "impostor":
        metrics["client"] = client + 1
    elif fault == "bad_examples":
        metrics["examples"] = -3
    elif fault == "inflated_examples":  # more than the rows it registered: to outweigh the round
        metrics["examples"] = 10**6
    elif fault == "nan_client":  # metrics of types perfit never sends: the server must not crash on them
        metrics["client"] = float("nan")
    elif fault == "list_seconds":
        metrics["compute_seconds"] = [1.0, 2.0]
    arrays["values"] = Array(values)


OVERWEIGHT = 100
"""The `overweight` client registers its train rows this many times over and claims as many examples
in every update, honest otherwise: a consistent lie that only the weight cap answers."""

HEAVY = "heavy_scale100"
"""`overweight` and `scale100` at once: one owner at both limits, the norm bound's and the weight cap's."""

HOSTILE = {"scale100": 100.0, "negate": -1.0, HEAVY: 100.0}
"""Finite, well-formed updates that pass every check: the client's honest change times this."""


def _scale_change(reply: Message, received: np.ndarray, factor: float) -> None:
    values = reply.content["arrays"]["values"].numpy()
    reply.content["arrays"]["values"] = Array((received + factor * (values - received)).astype(np.float32))


def faulty_app(faults: dict[int, str], hang_seconds: float = 0.0) -> ClientApp:
    """perfit's ClientApp, except that client `c` answers with fault `faults[c]`:
    one of TRAIN_FAULTS, `raise` (train and evaluate raise), `hang` (train sleeps `hang_seconds`),
    `over_budget_mask` (registers a mask holding every position), `no_mask` (a search reply without
    one), `overflow_nll` (an evaluation past float range), `nan_client` (train and evaluation replies
    naming client NaN), `forget_mask` / `other_mask` (the node
    loses its mask, or holds another, before each train message), `forget_kept` (the node loses the
    values it kept, FedSA-LoRA's B, before each train message), `raise_in_round_2` (train raises in
    round 2 only), `overweight` (OVERWEIGHT), or one of HOSTILE (a sound-looking update whose change
    from what the client received is scaled; HEAVY is also `overweight`)."""
    app = ClientApp()

    def _client(context: Context) -> int:
        return int(context.node_config["partition-id"])

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        reply = perfit_client.identify(msg, context)
        if faults.get(_client(context)) in ("overweight", HEAVY):  # distinct indices: repeating its own would not count
            rows = reply.content["rows"]
            rows["train"] = Array(np.arange(OVERWEIGHT * rows["train"].numpy().size, dtype=np.int64) + 10**7)
        return reply

    @app.query("search")
    def search(msg: Message, context: Context) -> Message:
        reply = perfit_client.search(msg, context)
        if faults.get(_client(context)) == "no_mask":
            return Message(RecordDict({"metrics": reply.content["metrics"]}), reply_to=msg)
        if faults.get(_client(context)) == "over_budget_mask":
            size = reply.content["arrays"]["mask"].numpy().size * 8
            reply.content["arrays"] = ArrayRecord({"mask": Array(np.packbits(np.ones(size, dtype=np.uint8)))})
        return reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault = faults.get(_client(context))
        if fault == "raise" or (fault == "raise_in_round_2" and int(msg.content["round"]["round"]) == 2):
            raise RuntimeError("injected client failure")
        if fault == "forget_kept":  # as a node restarted with its state-dir emptied
            for name in [key for key in context.state if key.startswith("personal@")]:
                del context.state[name]
            for path in Path(str(context.node_config["state-dir"])).glob("run-*/personal@*.safetensors"):
                path.unlink()
        if fault == "forget_mask" and "mask" in context.state:  # as a node restarted without its state
            del context.state["mask"]
        if fault == "other_mask" and "mask" in context.state:  # a mask searched again, and differently
            packed = context.state["mask"]["value"].numpy()
            context.state["mask"] = ArrayRecord({"value": Array(np.roll(packed, 1))})
        if fault == "hang":
            time.sleep(hang_seconds)
        received = msg.content["arrays"]["values"].numpy().copy()
        reply = perfit_client.train(msg, context)
        if fault in TRAIN_FAULTS:
            _corrupt(reply, fault, _client(context))
        if fault in HOSTILE:
            _scale_change(reply, received, HOSTILE[fault])
        if fault in ("overweight", HEAVY):
            reply.content["metrics"]["examples"] = OVERWEIGHT * int(reply.content["metrics"]["examples"])
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if faults.get(_client(context)) == "raise":
            raise RuntimeError("injected client failure")
        reply = perfit_client.evaluate(msg, context)
        if faults.get(_client(context)) == "overflow_nll":  # exp(1e6) is past float range
            reply.content["metrics"]["nll"], reply.content["metrics"]["tokens"] = 1e6, 1
        if faults.get(_client(context)) == "nan_client":  # in its evaluations too
            reply.content["metrics"]["client"] = float("nan")
        return reply

    return app
