"""Flower ServerApp: the run's phases (set up, rounds, final evaluation, outputs), client sampling,
checkpoints, the masks' search and each client's personalized payload. A train round's replies and
Eq. 6 are in `federation.updates`, evaluation in `federation.evaluation`.

The round loop is written on `Grid` (not a Strategy) because every client gets its own payload:
the global adapter at its own mask positions. Masks reach the server once, bit-packed; afterwards
only values at mask positions travel in either direction.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from rich.progress import Progress

from perfit.artifacts.base_model import model_config
from perfit.artifacts.lora import layout_for
from perfit.config import Config, from_mapping
from perfit.core.aggregate import personalize
from perfit.core.masks import PackedMasks, decode, gather
from perfit.core.methods import (
    FixedMasks,
    fixed_masks,
    global_start,
    resume_reads_nodes,
    shared_positions,
)
from perfit.core.robust import weight_cap
from perfit.federation.evaluation import Evaluation
from perfit.federation.exchange import NodeExchange, array_bytes
from perfit.federation.roster import NodesFailed, Roster, discover
from perfit.federation.run_directory import (
    RunDirectory,
    partitions_record,
    read_masks,
    read_start,
    restore_sampler,
    resumes_from_checkpoint,
    sampler_state,
)
from perfit.federation.updates import ROUND_RECORD, RoundUpdates
from perfit.federation.validation import mask_problem

log = logging.getLogger("perfit")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_mapping(dict(context.run_config))
    Federation(grid, config).run()


@dataclass
class _Rounds:
    """Where the round loop stands: its first and last round (after a resume, the first is the one
    after the checkpoint), the client sampler, and the byte and time totals."""

    first: int
    last: int
    sampler: random.Random
    totals: dict[str, Any] = field(default_factory=lambda: dict(bytes_up=0, bytes_down=0, seconds_before_resume=0.0))
    resumed: bool = False


@dataclass
class Federation(NodeExchange, RoundUpdates, Evaluation):
    """One run of FIT or PerFIT over the nodes behind `grid`: its phases, checkpoints, masks and
    payloads are here; the messages and the replies it waits for are `NodeExchange`'s
    (`federation.exchange`), a train round's replies checked and aggregated `RoundUpdates`'
    (`federation.updates`), an evaluation's `Evaluation`'s (`federation.evaluation`)."""

    grid: Grid
    config: Config
    masks: PackedMasks | FixedMasks = field(default_factory=lambda: PackedMasks(0))
    confirmed: set[int] = field(default_factory=set)  # clients whose node holds its registered mask
    roster: Roster = field(default_factory=Roster)  # which node each client is (`federation.roster`)
    model_fingerprint: str = ""  # of the base model every node runs
    rejected: list[dict[str, Any]] = field(default_factory=list)
    search_seconds: float = 0.0  # clients' compute time in Alg. 1, summed
    weight_cap: float = math.inf  # the largest example count an update weighs (`core.robust.weight_cap`)
    nonce: str = ""  # this run's id for its nodes' kept state: drawn at a fresh start, kept in the checkpoint
    # the round of each client's last train reply received: the version of the values its node kept
    # that it continues from (`node_store`); None after a resume from a checkpoint that predates it
    kept_rounds: dict[int, int] | None = field(default_factory=dict)
    kept_lost: list[dict[str, int]] = field(default_factory=list)  # nodes that lost them: restarted afresh
    final_seconds_kept: float = 0.0  # a stopped final evaluation's time up to its last reply kept
    final_started: float = 0.0  # time.perf_counter() when this process's final evaluation began
    final_kept_lost_from: int = 0  # the first of `kept_lost`'s entries made in this final evaluation
    in_final: bool = False  # resumed from the checkpoint taken at the start of the final evaluation
    status: Callable[[str], None] = field(default=lambda text: None, repr=False)

    def run(self) -> dict[str, Any]:
        """Set up, run the rounds (from the checkpoint when resuming), evaluate every client, write
        the outputs; returns the summary."""
        config = self.config
        started = time.perf_counter()
        model_path = self._setup()
        progress = self._start_rounds()
        with Progress(transient=False) as shown:
            bar = shown.add_task(f"{config.method}", total=config.rounds + 1, completed=progress.first - 1)
            self.status = lambda text: shown.update(bar, description=f"{config.method}: {text}")
            for round_number in range(progress.first, progress.last + 1):
                self._run_round(round_number, progress, started)
                shown.update(bar, advance=1)
            final = self._final_evaluation(progress, started)
            shown.update(bar, advance=1)
        summary = self._summary(final, progress, model_path, time.perf_counter() - started)
        self._write_outputs(final, summary, model_path)
        return summary

    # ---- the phases of a run ----
    def _setup(self) -> str:
        """The adapter layout (from the model's config, no weights), the seeded global adapter, the
        nodes and their clients' partitions, the run directory, and the masks of a method without a
        search. Returns the model path recorded with the run."""
        config = self.config
        self.layout = layout_for(model_config(config), config.dense_rank, config.alpha_value)  # no weights
        self.masks = PackedMasks(self.layout.size)
        self.global_flat = global_start(self.layout, config)
        self.shared = shared_positions(self.layout, config.method)
        self.roster = discover(self.grid, config)  # the clients open and validate their data; before any output
        model_path, self.model_fingerprint = self.roster.base_model()
        registered = [self.roster.train_rows(c) for c in config.participants if c in self.roster.nodes]
        self.weight_cap = weight_cap(registered, config.update_bound)
        if config.update_bound > 0 and config.clients_per_round < 3:
            log.warning(
                "update_bound with %d clients a round: the median of two change norms is their mean, so the "
                "bound cannot hold one hostile client of two",
                config.clients_per_round,
            )
        resuming = resumes_from_checkpoint(config)  # the checkpoint holds the adapter and the masks
        forgetful = self.roster.forgetful(config.participants) if resume_reads_nodes(config.method) else []
        if resuming and forgetful:  # their private values did not outlive the stopped run
            raise NodesFailed(
                f"cannot resume a {config.method} run: the nodes of clients {forgetful} keep their private "
                "values in memory only (no state-dir), so the stopped run took them along; run it again without resume"
            )
        partitions = partitions_record(self.roster.splits, config.held_out)
        if config.start_from and not resuming:  # another finished run's global adapter instead of the seeded one
            self.global_flat = read_start(config, self.layout, self.model_fingerprint, partitions)
        if config.masks_from and not resuming:  # the same search's masks: the nodes get them, none searches
            for client, mask in read_masks(config, self.layout, self.model_fingerprint, partitions).items():
                self.masks[client] = mask
        self.out = RunDirectory(config)
        if resuming:  # the checkpoint's masks, weights and private values are per client id
            self.out.check_same_partitions(partitions)
        self.out.write_partitions(self.roster.splits, config.held_out)
        fixed = fixed_masks(self.layout, config, config.participants)
        if fixed is not None:  # no search, nothing to register or checkpoint
            self.masks = fixed
            self.confirmed = set(self.masks)
        return model_path

    def _start_rounds(self) -> _Rounds:
        """The round loop's start: round 1, or after the last checkpointed round when resuming."""
        config = self.config
        progress = _Rounds(first=1, last=config.rounds, sampler=random.Random(config.seed))
        self.nonce = secrets.token_hex(8)  # a resume takes the checkpoint's instead
        checkpoint = self.out.load_checkpoint() if config.resume else None
        if checkpoint is not None:
            progress.first, progress.sampler, progress.totals = self._restore(*checkpoint)
            progress.resumed = True
        if not config.federated:  # `local`: no rounds, only the final (fine-tuning) evaluation
            progress.last = progress.first - 1
        return progress

    def _run_round(self, round_number: int, progress: _Rounds, started: float) -> None:
        """One round on a seeded sample of the participants, logged and checkpointed."""
        config = self.config
        sampled = sorted(progress.sampler.sample(config.participants, config.clients_per_round))
        record = self._round(round_number, sampled)
        progress.totals["bytes_up"] += record["bytes_up"]
        progress.totals["bytes_down"] += record["bytes_down"]
        self.out.append_metrics(record)
        self._checkpoint(round_number, progress.sampler, progress.totals, started)

    def _final_evaluation(self, progress: _Rounds, started: float) -> dict[str, Any]:
        """Every client evaluated (after local fine-tuning where the method asks for it). It starts
        from a checkpoint (a run without rounds, `local` or FIT + FT, has none before) and keeps each
        reply on disk as it arrives: a run stopped in it resumes with the clients still to go, under
        the same nonce, so their nodes find the values they kept."""
        everyone = self.config.final_eval
        # The searches come before the checkpoint, with their bytes: a run resumed from it searches none
        # again, so a client whose search failed stays unevaluated and rejected once, as without the stop.
        if not self.in_final:
            progress.totals["bytes_up"] += self._ensure_masks(everyone)
        self._checkpoint(progress.last, progress.sampler, progress.totals, started, final=True)
        self.status(f"evaluating {len(everyone)} clients")
        final = self._evaluate(everyone, self.config.rounds, self.config.final_finetune_epochs, final=True)
        self.status(f"done: personalized perplexity {final['personalized_ppl']:.3f}")
        return final

    def _summary(self, final: dict[str, Any], progress: _Rounds, model_path: str, seconds: float) -> dict[str, Any]:
        config, totals = self.config, progress.totals
        return {
            "method": config.method,
            "split": config.split,
            "evaluated_on": "validation" if config.validation else "held_out",
            "personalized_ppl": final["personalized_ppl"],
            "overall_ppl": final["overall_ppl"],
            "per_client_ppl": {str(c): v for c, v in final["per_client_ppl"].items()},
            **{k: final[k] for k in ("rouge_l", "per_client_rouge_l") if k in final},
            "trainable_params_per_client": {str(c): int(m.sum()) for c, m in sorted(self.masks.items())},
            "bytes_up_total": totals["bytes_up"],  # the final evaluation's searches included
            "bytes_down_total": totals["bytes_down"] + final["bytes_down"],
            "wall_seconds": totals["seconds_before_resume"] + self.final_seconds_kept + seconds,
            "search_seconds": self.search_seconds,
            "rounds": config.rounds,
            "dense_rank": config.dense_rank,
            "rejected_updates": self.rejected,
            "kept_lost": self.kept_lost,
            **({"masks_from": config.masks_from} if config.masks_from else {}),  # searched there, not here
            "client_adapters": "server" if self._server_holds_clients() else "clients",
            "held_out_clients": config.held_out,
            "client_names": {str(c): name for c, name in sorted(self.roster.names.items())},
            "resumed_at_round": progress.first if progress.resumed else None,
            "model": model_path,
            "model_fingerprint": self.model_fingerprint,
            "out": str(self.out.path),
        }

    def _write_outputs(self, final: dict[str, Any], summary: dict[str, Any], model_path: str) -> None:
        """The final metrics line, the searched masks, the adapters the server holds, the summary."""
        config = self.config
        self.out.append_metrics(
            {"round": config.rounds, "final": True, **{k: final[k] for k in ("personalized_ppl", "overall_ppl")}}
        )
        self.out.write_masks(self.masks if config.method == "perfit" else {})
        adapters: dict[int | str, torch.Tensor] = {}
        if self._server_holds_clients():
            adapters = {c: personalize(self.global_flat, m) for c, m in self.masks.items()}
        if config.federated:
            adapters["global"] = self.global_flat
        self.out.write_adapters(self.layout, adapters, config.dense_rank, config.alpha_value, model_path)
        self.out.write_summary(summary)

    def _server_holds_clients(self) -> bool:
        """Whether the server holds every client's final adapter: not when part of it stays on the
        client (FedSA-LoRA's B, `local`) or is fine-tuned there before the final evaluation."""
        return bool(self.shared.all()) and self.config.final_finetune_epochs == 0

    def _round(self, round_number: int, sampled: list[int]) -> dict[str, Any]:
        """Masks for newcomers, local training, Eq. 6 aggregation and optional evaluation."""
        config = self.config
        round_started = time.perf_counter()
        up_search = self._ensure_masks(sampled)
        self.status(f"round {round_number}/{config.rounds}: training {len(sampled)} clients")
        train = self._train_round(sampled, round_number)
        record = {
            "round": round_number,
            "clients": sampled,
            "accepted": train["accepted"],
            "counted": train["counted"],
            **{k: train[k] for k in ROUND_RECORD if k in train},
            "train_loss": train["loss"],
            "bytes_up": up_search + train["bytes_up"],
            "bytes_down": train["bytes_down"],
        }
        if config.eval_every and round_number % config.eval_every == 0:
            evaluation = self._evaluate(sampled, round_number)
            record.update({k: evaluation[k] for k in ("personalized_ppl", "per_client_ppl", "overall_ppl")})
            record["bytes_down"] += evaluation["bytes_down"]
        record["seconds"] = time.perf_counter() - round_started
        return record

    # ---- checkpoint and resume ----
    def _checkpoint(
        self, round_number: int, sampler: random.Random, totals: dict[str, Any], started: float, final: bool = False
    ) -> None:
        """The server's state after `round_number`, or (`final`) at the start of the final evaluation,
        after its searches."""
        tensors = {"global": self.global_flat}
        if isinstance(self.masks, PackedMasks):  # searched masks; fixed ones are rebuilt on resume
            tensors.update({f"mask_{c}": torch.from_numpy(self.masks.packed(c)) for c in self.masks})
        state = {
            "round": round_number,
            "sampler": sampler_state(sampler),
            "bytes_up": totals["bytes_up"],
            "bytes_down": totals["bytes_down"],
            "seconds": totals["seconds_before_resume"] + time.perf_counter() - started,
            "rejected": self.rejected,
            "kept_lost": self.kept_lost,
            "search_seconds": self.search_seconds,
            "nonce": self.nonce,
            "kept_rounds": None if self.kept_rounds is None else {str(c): r for c, r in self.kept_rounds.items()},
            "final": final,
        }
        self.out.save_checkpoint(tensors, state)

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> tuple[int, random.Random, dict]:
        """Server state after the checkpointed round; nodes get their masks back with their next message."""
        self.global_flat = tensors["global"]
        for name, packed in tensors.items():
            if name.startswith("mask_"):
                self.masks.set_packed(int(name.removeprefix("mask_")), packed.numpy())
        self.confirmed = set(self.masks) if self.config.method != "perfit" else set()
        self.rejected = list(state["rejected"])
        self.kept_lost = list(state.get("kept_lost", []))
        self.search_seconds = float(state.get("search_seconds", 0.0))  # checkpoints before it was kept: 0
        self.nonce = str(state.get("nonce", ""))  # an older checkpoint's nodes keyed their state by config only
        kept = state.get("kept_rounds")  # an older checkpoint's: the nodes continue from their newest values
        self.kept_rounds = None if kept is None else {int(c): int(r) for c, r in kept.items()}
        self.in_final = bool(state.get("final", False))
        log.info("resuming %s after round %d", self.out.path, state["round"])
        totals = {"bytes_up": state["bytes_up"], "bytes_down": state["bytes_down"]}
        totals["seconds_before_resume"] = state["seconds"]
        return state["round"] + 1, restore_sampler(state["sampler"]), totals

    # ---- masks and payloads ----
    def _ensure_masks(self, clients: list[int]) -> int:
        """Ask clients without a mask to search one (Alg. 1), once; returns bytes uploaded."""
        todo = [c for c in clients if c not in self.masks]
        if not todo:
            return 0
        self.status(f"searching masks (Alg. 1) for {len(todo)} clients")
        replies = self._exchange({c: self._message(c, "query.search", None, 0) for c in todo})
        uploaded = 0
        for client, reply in replies.items():
            try:
                arrays = reply.content["arrays"]
                uploaded += array_bytes(arrays)
                mask = decode(arrays["mask"].numpy(), self.layout.size)
                seconds = float(reply.content["metrics"].get("seconds", 0.0)) if "metrics" in reply.content else 0.0
            except Exception as err:  # no mask, a mask of the wrong size or type: that client's, not the run's
                self._malformed(client, err)
                continue
            self.search_seconds += seconds
            problem = mask_problem(int(mask.sum()), self.layout.budget(self.config.client_rank_budget(client)))
            if problem:
                self._reject(client, problem)
                continue
            self.masks[client] = mask
            self.confirmed.add(client)
        return uploaded

    def _payload(self, client: int) -> ArrayRecord:
        values = gather(self.global_flat, self.masks[client] & self.shared).numpy().astype(np.float32)
        return ArrayRecord({"values": Array(values)})

    def _send(
        self,
        clients: list[int],
        message_type: str,
        round_number: int,
        finetune: int = 0,
        final: bool = False,
        arrived: Callable[[int, Message, int], None] | None = None,
    ) -> tuple[dict[int, Message], int]:
        """Each client's adapter at its own (shared) mask positions; (replies, bytes sent down).
        `arrived(client, reply, bytes sent to it)`: called with each reply as it comes (`_exchange`)."""
        ready = [c for c in clients if c in self.masks]
        messages = {c: self._message(c, message_type, self._payload(c), round_number, finetune, final) for c in ready}
        sent = {c: sum(array_bytes(record) for record in m.content.array_records.values()) for c, m in messages.items()}
        each = None if arrived is None else lambda client, reply: arrived(client, reply, sent[client])
        return self._exchange(messages, each), sum(sent.values())
