"""Flower ServerApp: sampling, personalized payloads, Eq. 6 aggregation, evaluation and outputs.

The round loop is written on `Grid` (not a Strategy) because every client gets its own payload:
the global adapter at its own mask positions. Masks reach the server once, bit-packed; afterwards
only values at mask positions travel in either direction.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.progress import Progress

from perfit.aggregate import aggregate, personalize
from perfit.config import Config, from_mapping
from perfit.data import load_rows, partition
from perfit.masks import decode, gather, scatter
from perfit.model import layout_for, resolve_model
from perfit.outputs import RunDirectory
from perfit.task import global_start
from perfit.train import perplexity

log = logging.getLogger("perfit")
app = ServerApp()
NODE_WAIT_SECONDS = 120.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_mapping(dict(context.run_config))
    Federation(grid, config).run()


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays in a payload as Flower serializes them."""
    return record.count_bytes()


@dataclass
class Federation:
    """One run of FIT or PerFIT over the nodes behind `grid`."""

    grid: Grid
    config: Config
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    nodes: dict[int, int] = field(default_factory=dict)  # client id -> node id
    rejected: list[dict[str, Any]] = field(default_factory=list)
    status: Callable[[str], None] = field(default=lambda text: None, repr=False)

    def run(self) -> dict[str, Any]:
        config = self.config
        started = time.perf_counter()
        rows = load_rows(config.data)  # validates the data before any output is written
        splits = partition(rows, config)
        model_path = resolve_model(config)
        self.layout = layout_for(model_path, config.dense_rank, config.alpha_value)
        self.global_flat = global_start(self.layout, config)
        self.out = RunDirectory(config)
        self.out.write_partitions(splits)
        self._discover_nodes()
        if config.method == "fit":
            self.masks = {c: torch.ones(self.layout.size, dtype=torch.bool) for c in range(config.num_clients)}
        sampler = random.Random(config.seed)
        bytes_up_total = bytes_down_total = 0
        with Progress(transient=False) as progress:
            bar = progress.add_task(f"{config.method}", total=config.rounds + 1)
            self.status = lambda text: progress.update(bar, description=f"{config.method}: {text}")
            for round_number in range(1, config.rounds + 1):
                round_started = time.perf_counter()
                sampled = sorted(sampler.sample(range(config.num_clients), config.clients_per_round))
                up_search = self._ensure_masks(sampled)
                self.status(f"round {round_number}/{config.rounds}: training {len(sampled)} clients")
                train = self._train_round(sampled, round_number)
                record = {
                    "round": round_number,
                    "clients": sampled,
                    "train_loss": train["loss"],
                    "bytes_up": up_search + train["bytes_up"],
                    "bytes_down": train["bytes_down"],
                }
                if config.eval_every and round_number % config.eval_every == 0:
                    evaluation = self._evaluate(sampled, round_number)
                    record.update({k: evaluation[k] for k in ("personalized_ppl", "per_client_ppl", "overall_ppl")})
                    record["bytes_down"] += evaluation["bytes_down"]
                record["seconds"] = time.perf_counter() - round_started
                bytes_up_total += record["bytes_up"]
                bytes_down_total += record["bytes_down"]
                self.out.append_metrics(record)
                progress.update(bar, advance=1)
            everyone = list(range(config.num_clients))
            final_up = self._ensure_masks(everyone)
            self.status(f"evaluating {len(everyone)} clients")
            final = self._evaluate(everyone, config.rounds)
            self.status(f"done: personalized perplexity {final['personalized_ppl']:.3f}")
            progress.update(bar, advance=1)
        bytes_up_total += final_up
        bytes_down_total += final["bytes_down"]
        summary = {
            "method": config.method,
            "split": config.split,
            "personalized_ppl": final["personalized_ppl"],
            "overall_ppl": final["overall_ppl"],
            "per_client_ppl": {str(c): v for c, v in final["per_client_ppl"].items()},
            "trainable_params_per_client": {str(c): int(m.sum()) for c, m in sorted(self.masks.items())},
            "bytes_up_total": bytes_up_total,
            "bytes_down_total": bytes_down_total,
            "wall_seconds": time.perf_counter() - started,
            "rounds": config.rounds,
            "dense_rank": config.dense_rank,
            "rejected_updates": self.rejected,
            "model": model_path,
            "out": str(self.out.path),
        }
        self.out.append_metrics(
            {"round": config.rounds, "final": True, **{k: final[k] for k in ("personalized_ppl", "overall_ppl")}}
        )
        self.out.write_masks(self.masks if config.method == "perfit" else {})
        personalized = {c: personalize(self.global_flat, mask) for c, mask in self.masks.items()}
        self.out.write_adapters(self.layout, personalized, config.dense_rank, config.alpha_value, model_path)
        self.out.write_summary(summary)
        return summary

    # ---- messaging ----
    def _message(self, client: int, message_type: str, arrays: ArrayRecord | None, round_number: int) -> Message:
        content = RecordDict(
            {"run": ConfigRecord(self.config.to_dict()), "round": ConfigRecord({"round": round_number})}
        )
        if arrays is not None:
            content["arrays"] = arrays
        return Message(content, dst_node_id=self.nodes[client], message_type=message_type, group_id=str(round_number))

    def _exchange(self, messages: dict[int, Message]) -> dict[int, Message]:
        """Send and collect replies by client; failed or missing replies are logged and dropped."""
        by_node = {message.metadata.dst_node_id: client for client, message in messages.items()}
        replies, failed = {}, set()
        for reply in self.grid.send_and_receive(list(messages.values())):
            client = by_node[reply.metadata.src_node_id]
            if reply.has_error():
                failed.add(client)
                self._reject(client, f"client error: {reply.error.reason.strip().splitlines()[-1]}")
            else:
                replies[client] = reply
        for client in sorted(set(messages) - set(replies) - failed):
            self._reject(client, "no reply")
        return replies

    def _reject(self, client: int, reason: str) -> None:
        log.warning("client %d: update rejected: %s", client, reason)
        self.rejected.append({"client": client, "reason": reason})

    def _discover_nodes(self) -> None:
        """Map client (partition) ids to node ids; simulation nodes register shortly after start."""
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while len(node_ids := list(self.grid.get_node_ids())) < self.config.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of {self.config.num_clients} nodes connected")
            time.sleep(0.1)
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in self.grid.send_and_receive(messages):
            if not reply.has_error():
                self.nodes[int(reply.content["info"]["client"])] = reply.metadata.src_node_id
        missing = set(range(self.config.num_clients)) - set(self.nodes)
        if missing:
            raise RuntimeError(f"no node answered for clients {sorted(missing)}")

    # ---- the three phases ----
    def _ensure_masks(self, clients: list[int]) -> int:
        """Ask clients without a mask to search one (Alg. 1), once; returns bytes uploaded."""
        todo = [c for c in clients if c not in self.masks]
        if not todo:
            return 0
        self.status(f"searching masks (Alg. 1) for {len(todo)} clients")
        replies = self._exchange({c: self._message(c, "query.search", None, 0) for c in todo})
        uploaded = 0
        for client, reply in replies.items():
            arrays = reply.content["arrays"]
            uploaded += array_bytes(arrays)
            try:
                mask = decode(arrays["mask"].numpy(), self.layout.size)
            except ValueError as err:
                self._reject(client, f"bad mask: {err}")
                continue
            expected = self.layout.budget(self.config.client_rank_budget(client))
            if int(mask.sum()) != expected:
                self._reject(client, f"mask holds {int(mask.sum())} positions, budget is {expected}")
                continue
            self.masks[client] = mask
        return uploaded

    def _payload(self, client: int) -> ArrayRecord:
        values = gather(self.global_flat, self.masks[client]).numpy().astype(np.float32)
        return ArrayRecord({"values": Array(values)})

    def _train_round(self, sampled: list[int], round_number: int) -> dict[str, Any]:
        ready = [c for c in sampled if c in self.masks]
        messages = {c: self._message(c, MessageType.TRAIN, self._payload(c), round_number) for c in ready}
        bytes_down = sum(array_bytes(m.content["arrays"]) for m in messages.values())
        updates, losses, bytes_up = [], [], 0
        for client, reply in self._exchange(messages).items():
            bytes_up += array_bytes(reply.content["arrays"])
            metrics = reply.content["metrics"]
            values = torch.from_numpy(reply.content["arrays"]["values"].numpy().copy()).float()
            mask = self.masks[client]
            problem = _check_update(values, mask, metrics)
            if problem:
                self._reject(client, problem)
                continue
            if int(metrics["examples"]) == 0:
                continue  # a client without train rows has nothing to contribute
            updates.append((mask, scatter(values, mask), float(metrics["examples"])))
            losses.append((float(metrics["train_loss"]), float(metrics["examples"])))
        if updates:
            self.global_flat = aggregate(self.config.aggregation, self.global_flat, updates)
        weight = sum(w for _, w in losses)
        loss = sum(v * w for v, w in losses) / weight if weight else float("nan")
        return {"loss": loss, "bytes_up": bytes_up, "bytes_down": bytes_down}

    def _evaluate(self, clients: list[int], round_number: int) -> dict[str, Any]:
        """Personalized perplexity: each client's own adapter (FIT: the global one) on its eval rows."""
        ready = [c for c in clients if c in self.masks]
        messages = {c: self._message(c, MessageType.EVALUATE, self._payload(c), round_number) for c in ready}
        bytes_down = sum(array_bytes(m.content["arrays"]) for m in messages.values())
        per_client, nll_total, token_total = {}, 0.0, 0
        for client, reply in sorted(self._exchange(messages).items()):
            nll, tokens = float(reply.content["metrics"]["nll"]), int(reply.content["metrics"]["tokens"])
            per_client[client] = perplexity(nll, tokens)
            nll_total += nll
            token_total += tokens
        measured = [v for v in per_client.values() if math.isfinite(v)]
        return {
            "personalized_ppl": sum(measured) / len(measured) if measured else float("nan"),
            "overall_ppl": perplexity(nll_total, token_total),
            "per_client_ppl": per_client,
            "bytes_down": bytes_down,
        }


def _check_update(values: torch.Tensor, mask: torch.Tensor, metrics: Any) -> str | None:
    """Why a client update must not be averaged in, or None when it is sound."""
    if values.numel() != int(mask.sum()):
        return f"{values.numel()} values for a mask of {int(mask.sum())} positions"
    if not torch.isfinite(values).all():
        return "non-finite values"
    examples = metrics.get("examples")
    if examples is None or int(examples) < 0:
        return f"bad example count {examples!r}"
    return None
