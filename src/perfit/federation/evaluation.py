"""Evaluating clients on the server's side, for `Federation` (`federation.server_app`), which it is
mixed into: each client's personalized perplexity (Eq. 6's adapter read through its own mask; FIT's
global one) and ROUGE-L from its node's reply, checked (`validation.evaluation_problem`), combined
into the run's personalized and overall perplexity. At the final evaluation each reply is kept on
disk as it arrives, so a run stopped there resumes with the clients still to go.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Message, MessageType

from perfit.core.metrics import perplexity
from perfit.federation.exchange import reply_metrics
from perfit.federation.run_directory import RunDirectory
from perfit.federation.validation import evaluation_problem

log = logging.getLogger("perfit")


class Evaluation:
    """The evaluation of clients, for `Federation`: the state it reads and keeps is the run's (set
    up there); sending is `Federation._send`'s, rejecting `NodeExchange`'s."""

    out: RunDirectory
    nonce: str
    kept_lost: list[dict[str, int]]
    final_seconds_kept: float
    final_started: float
    final_kept_lost_from: int
    _send: Callable[..., tuple[dict[int, Message], int]]
    _reject: Callable[[int, str], None]
    _malformed: Callable[[int, Exception], None]

    def _keep_final_reply(self, client: int, reply: Message, bytes_down: int) -> None:
        """A final-evaluation reply on disk as it arrives, with what the summary counts for it (the
        bytes sent to its client, the final evaluation's seconds so far, a restart of its node's kept
        values), when its metrics are sound; an unsound one is not kept: `_evaluate` rejects it, and a
        resumed run asks that client again."""
        try:
            metrics = reply_metrics(reply)
            if evaluation_problem(client, metrics):
                return
        except Exception:  # noqa: BLE001 - metrics of the wrong types: `_evaluate` rejects and logs them
            return
        record = {
            "metrics": metrics,
            "seconds": self.final_seconds_kept + time.perf_counter() - self.final_started,
            "bytes_down": bytes_down,
            "kept_lost": [e for e in self.kept_lost[self.final_kept_lost_from :] if e["client"] == client],
        }
        self.out.keep_final_reply(client, self.nonce, record)

    def _final_replies_kept(self, clients: list[int]) -> tuple[dict[int, dict[str, Any]], int]:
        """The metrics of the final-evaluation replies a stopped run of this nonce kept, by client, and
        the bytes sent for them; what else they count (seconds, nodes' restarted values) is restored."""
        kept = {c: r for c, r in self.out.kept_final_replies(self.nonce).items() if c in clients}
        if kept:
            log.info("final evaluation: %d clients' replies kept before the stop", len(kept))
        self.final_seconds_kept = max((float(r["seconds"]) for r in kept.values()), default=0.0)
        self.kept_lost.extend(entry for c in sorted(kept) for entry in kept[c]["kept_lost"])
        self.final_kept_lost_from, self.final_started = len(self.kept_lost), time.perf_counter()
        return {c: r["metrics"] for c, r in kept.items()}, sum(int(r["bytes_down"]) for r in kept.values())

    def _evaluate(
        self, clients: list[int], round_number: int, finetune: int = 0, final: bool = False
    ) -> dict[str, Any]:
        """Personalized perplexity: each client's own adapter (FIT: the global one) on its eval rows,
        after `finetune` local epochs on the client when asked; at the `final` evaluation each node
        also keeps its owner's adapter (in its state-dir)."""
        kept, bytes_down = self._final_replies_kept(clients) if final else ({}, 0)
        todo = [c for c in clients if c not in kept]
        arrived = self._keep_final_reply if final else None
        replies, bytes_sent = self._send(todo, MessageType.EVALUATE, round_number, finetune, final, arrived)
        bytes_down += bytes_sent
        received: dict[int, Message | dict[str, Any]] = {**kept, **replies}
        per_client, nll_total, token_total, rouge = {}, 0.0, 0, {}
        for client, reply in sorted(received.items()):
            try:
                metrics = reply if isinstance(reply, dict) else reply_metrics(reply)
                problem = evaluation_problem(client, metrics)
                if not problem:
                    nll, tokens = float(metrics["nll"]), int(metrics["tokens"])
                    count = int(metrics.get("rouge_l_count", 0))
                    answers = float(metrics["rouge_l_sum"]) / count if count > 0 else None
            except Exception as err:  # metrics of the wrong types: that client's, not the run's
                self._malformed(client, err)
                continue
            if problem:
                self._reject(client, problem)
                continue
            per_client[client] = perplexity(nll, tokens)
            nll_total += nll
            token_total += tokens
            if answers is not None:
                rouge[client] = answers
        measured = [v for v in per_client.values() if not math.isnan(v)]  # a diverged client's inf counts
        result = {
            "personalized_ppl": sum(measured) / len(measured) if measured else float("nan"),
            "overall_ppl": perplexity(nll_total, token_total),
            "per_client_ppl": per_client,
            "bytes_down": bytes_down,
        }
        if rouge:  # the final evaluation's ROUGE-L (`rouge_samples`): mean over each client's sample
            result["rouge_l"] = sum(rouge.values()) / len(rouge)
            result["per_client_rouge_l"] = {str(c): v for c, v in sorted(rouge.items())}
        return result
