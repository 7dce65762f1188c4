"""What a node does with each message: thin glue over `perfit.client.task.ClientTask`, run in the
ClientApp's process (a simulation) or in the node's long-lived worker (`node_worker`), which
`client_app` forwards each message to on a Deployment Engine node with a `state-dir`.

Messages (the server sends the resolved run config with every message, so a client needs no run
config of its own):
- `query`: which client this node is and which rows it holds (for partitions.json): an owner's node
  its name and its train / eval counts only; a research split's node its rows' indices. Every later
  message carries the client id the server gave the node (`round.client`).
- any message may carry `registered`: the client's mask as the server registered it (sent after a
  server resume, when the node's state is gone); the node keeps it instead of searching again.
- `query.search`: run Alg. 1 once, keep the mask in the node's state, send it bit-packed.
- `train`: values at the mask positions in, local masked training, values at the mask positions out.
  Methods that keep part of the adapter on the client (FedSA-LoRA's B, `local`) exchange only the
  shared positions and keep the rest in the node state (`personal`, by the round that trained it:
  `node_store`); it never leaves the node. Train and evaluation messages name the version to
  continue from (`round.kept_round`).
- `evaluate`: personalized NLL of the received adapter on the client's held-out rows, after
  `finetune` local epochs when the server asks for them (final evaluation of FIT + FT, `local`).

Node config (`flower-supernode --node-config`). A data owner's node (`split=owner`): `data`, the
owner's own file, which is this client's whole dataset; `name`, the owner's name in every output
(unique in the federation; default the file's stem); optional `model`, this machine's copy of the
base model. A research split's node (simulation sets the first two): `partition-id` is the client
this node is, `num-partitions` (optional) must equal the run's num_clients, and `data` / `model`
(optional) point at this machine's copy of the run's dataset / base model.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from perfit.artifacts.base_model import model_fingerprint
from perfit.artifacts.lora import save_adapter
from perfit.client.task import ClientTask, client_task
from perfit.config import from_mapping
from perfit.core.masks import MASK_LOST, decode, digest, encode, gather, scatter
from perfit.federation.node_store import KEPT_LOST, STATE_DIR, NodeStore
from perfit.federation.node_worker import process_age_seconds

LOCAL_PATHS = ("data", "model")  # node config keys that override the run config on this node


def _client_id(context: Context, msg: Message | None = None) -> int:
    """The client this node is: the id the server gave it (every message after the first query
    carries it), else its node config's `partition-id` (0 for an owner's node, which has none)."""
    if msg is not None and "round" in msg.content and "client" in msg.content["round"]:
        return int(msg.content["round"]["client"])
    return int(context.node_config.get("partition-id", 0))


def _task(msg: Message, context: Context) -> ClientTask:
    settings = dict(msg.content["run"])
    settings.update({key: context.node_config[key] for key in LOCAL_PATHS if key in context.node_config})
    partitions = context.node_config.get("num-partitions", settings["num_clients"])
    if int(partitions) != int(settings["num_clients"]):
        raise ValueError(f"node config num-partitions={partitions}, but the run has {settings['num_clients']} clients")
    return client_task(from_mapping(settings))


def _step(msg: Message | None) -> Any:
    """The message's round record (round, client, the run's id, the registered mask's digest); empty
    for the identify query and the node's own search."""
    return msg.content["round"] if msg is not None and "round" in msg.content else {}


def _nonce(msg: Message) -> str:
    """The run's id the server sends with every message after the identify query (none from an older
    server: the state is keyed by the config alone, as before)."""
    return str(_step(msg).get("run_nonce", ""))


def _mask(task: ClientTask, client: int, store: NodeStore, msg: Message | None = None) -> torch.Tensor:
    """The client's static mask: fixed for FIT and the baselines, else searched once (`query.search`)
    and kept by the node, or the registered mask the server sends back (after a resume, or when
    the node lost it). A train or evaluation message names the registered mask's digest; a node
    holding no mask or another one never searches again there (a search need not give the same mask
    twice, e.g. on a GPU): it raises MASK_LOST, and the server sends the mask."""
    if task.fixed is not None:
        return task.fixed[client]
    if msg is not None and "registered" in msg.content:
        store.put("mask", msg.content["registered"]["mask"].numpy())
    expected = _step(msg).get("mask_digest")
    if expected is not None and ("mask" not in store or digest(store.get("mask")) != expected):
        raise RuntimeError(f"{MASK_LOST}: client {client}'s node holds no mask or another than the registered one")
    if "mask" not in store:
        store.put("mask", encode(task.search(client)))
    return decode(store.get("mask"), task.layout.size)


def _reply(msg: Message, metrics: dict, **arrays: np.ndarray) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays:
        content["arrays"] = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return Message(content, reply_to=msg)


def _kept_round(msg: Message) -> int | None:
    """The round of the client's last train reply the server received: the version of its kept
    values the node continues from (0 before its first; None from an older server: the newest)."""
    value = _step(msg).get("kept_round")
    return None if value is None else int(value)


def _start(msg: Message, store: NodeStore, task: ClientTask, mask: torch.Tensor) -> torch.Tensor:
    """The received values at the shared mask positions, the node's own kept values elsewhere."""
    values = torch.from_numpy(msg.content["arrays"]["values"].numpy().copy())
    received = scatter(values, mask & task.shared)
    kept, version = None, _kept_round(msg)
    if not bool(task.shared.all()) and version != 0:
        kept = store.get_version("personal", version)
        if kept is None and version is not None:
            client = _step(msg).get("client")
            raise RuntimeError(f"{KEPT_LOST}: client {client}'s node holds no values kept after round {version}")
    personal = None if kept is None else scatter(torch.from_numpy(kept.copy()), mask)
    return task.starting_point(received, personal) * mask


def _keep(
    store: NodeStore, task: ClientTask, flat: torch.Tensor, mask: torch.Tensor, version: int, keep_from: int | None
) -> None:
    """Keep the trained adapter on the node, as version `version`, when part of it is not shared;
    versions below `keep_from` (the one this round started from) are no longer needed."""
    if not bool(task.shared.all()):
        store.put_version("personal", gather(flat, mask).numpy().astype(np.float32), version, keep_from)


def _write_adapter(store: NodeStore, task: ClientTask, flat: torch.Tensor) -> None:
    """At the end of a run: the owner's personalized adapter, in PEFT format, in the node's state-dir.
    Written beside it and then moved into place, so a kill leaves the previous adapter or the new one."""
    if store.directory is not None:
        config = task.config
        final, staging, old = (store.directory / name for name in ("adapter", ".adapter.new", ".adapter.old"))
        shutil.rmtree(staging, ignore_errors=True)
        save_adapter(staging, task.layout, flat, config.dense_rank, config.alpha_value, task.model_path)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def identify(msg: Message, context: Context) -> Message:
    """Which client this node is and which rows it holds: an owner's node its name and the counts of
    its train / eval rows (never the rows); a research split's node its partition id and its rows'
    indices into the shared file. Every node also says which base model it runs and whether what it
    keeps is on disk (a state-dir) or in memory only."""
    client = _client_id(context)
    task = _task(msg, context)
    split = task.split_of(client)  # opens and validates the node's data: errors name file, line, field
    model = {"model": task.model_path, "model_fingerprint": model_fingerprint(task.model_path)}
    model["keeps_state"] = int(bool(context.node_config.get(STATE_DIR)))  # its kept values outlive a restart
    if task.owners:
        name = str(context.node_config.get("name", task.owner_name(client)))
        counts = {"train_rows": len(split.train), "eval_rows": len(split.eval)}
        info = {"client": client, "name": name, **counts, **model}
        return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)
    rows = {part: Array(np.asarray(getattr(split, part), dtype=np.int64)) for part in ("train", "eval")}
    content = RecordDict({"info": ConfigRecord({"client": client, **model}), "rows": ArrayRecord(rows)})
    return Message(content, reply_to=msg)


def search(msg: Message, context: Context) -> Message:
    client = _client_id(context, msg)
    task = _task(msg, context)
    store = NodeStore(context, task.config, _nonce(msg))
    state_before = "mask" in store
    started = time.perf_counter()
    mask = _mask(task, client, store)
    metrics = {"client": client, "cached": int(state_before), "seconds": time.perf_counter() - started}
    return _reply(msg, metrics, mask=encode(mask))


def train(msg: Message, context: Context, started: float | None = None, startup: float | None = None) -> Message:
    """Local masked training. The reply's metrics also say where the message's time went: the
    ClientApp process's life before its handler (`startup_seconds`: on a Deployment Engine node a
    fresh process per message, so Flower's start and the ClientApp's imports), what came before
    training (`setup_seconds`: handing the message to the node's worker, loading the model and the
    client's rows where this process has not yet) and training itself (`compute_seconds`).
    `started` (wall clock) and `startup` are the ClientApp process's when it forwarded the message
    to the node's worker; by default this process's own."""
    if started is None:
        started, startup = time.time(), process_age_seconds()
    client = _client_id(context, msg)
    task = _task(msg, context)
    store = NodeStore(context, task.config, _nonce(msg))
    mask = _mask(task, client, store, msg)
    task.examples(client, "train")  # the model, the tokenizer and the rows, loaded once per process
    compute_started = time.time()
    round_number = int(msg.content["round"]["round"])
    result = task.train(client, _start(msg, store, task, mask), mask, round_number)
    compute = time.time() - compute_started
    _keep(store, task, result.flat, mask, round_number, _kept_round(msg))
    values = gather(result.flat, mask & task.shared).numpy().astype(np.float32)
    metrics = {"client": client, "examples": result.examples, "train_loss": result.loss, "steps": result.steps}
    seconds = {"startup_seconds": startup, "setup_seconds": compute_started - started, "compute_seconds": compute}
    return _reply(msg, {**metrics, **seconds}, values=values)


def evaluate(msg: Message, context: Context) -> Message:
    client = _client_id(context, msg)
    task = _task(msg, context)
    store = NodeStore(context, task.config, _nonce(msg))
    mask = _mask(task, client, store, msg)
    flat = _start(msg, store, task, mask)
    metrics = {"client": client}
    epochs = int(msg.content["round"].get("finetune", 0))
    if epochs:  # local fine-tuning before the final evaluation; the result stays on the node
        result = task.train(client, flat, mask, task.config.rounds + 1, epochs=epochs)
        flat = result.flat
        _keep(store, task, flat, mask, task.config.rounds + 1, _kept_round(msg))
        metrics["finetune_loss"] = result.loss
    if int(msg.content["round"].get("final", 0)):
        _write_adapter(store, task, flat)
        if task.config.rouge_samples:
            scores = task.rouge_l(client, flat)
            metrics.update({"rouge_l_sum": float(sum(scores)), "rouge_l_count": len(scores)})
    total_nll, tokens = task.evaluate(client, flat)
    return _reply(msg, {**metrics, "nll": total_nll, "tokens": tokens})
