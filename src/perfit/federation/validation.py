"""What the server checks before a client's reply is used: pure functions on numpy arrays and plain
values, each returning the reason to reject (logged with the client id) or None when sound."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PAYLOAD_SLACK_BYTES = 1 << 20  # metadata and record overhead allowed above the values themselves


def last_line(reason: str) -> str:
    """The last line of a client's error reason (its exception's message), or a placeholder for an
    empty one: what the server logs and records."""
    lines = str(reason).strip().splitlines()
    return lines[-1] if lines else "(no reason given)"


def payload_limit_bytes(mask_positions: int) -> int:
    """The largest train reply accepted from a client holding `mask_positions` positions."""
    return 4 * mask_positions + PAYLOAD_SLACK_BYTES


def update_problem(
    client: int,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    mask_positions: int,
    registered_mask: np.ndarray | None,
    payload_bytes: int,
    train_rows: int | None = None,
) -> str | None:
    """Why a train reply must not be averaged in: identity, payload size, the mask (it is registered
    once and cannot change), the values' dtype, shape and finiteness, and the example count (a whole
    number, at most the `train_rows` the client registered: it is the update's aggregation weight)."""
    claimed = metrics.get("client")
    if claimed is None or int(claimed) != client:
        return f"reply claims to be client {claimed!r}, sent to client {client}"
    limit = payload_limit_bytes(mask_positions)
    if payload_bytes > limit:
        return f"payload of {payload_bytes} bytes is over the limit of {limit} bytes"
    if "mask" in arrays and (registered_mask is None or not np.array_equal(arrays["mask"], registered_mask)):
        return "mask changed after registration"
    unexpected = sorted(set(arrays) - {"values", "mask"})
    if unexpected or "values" not in arrays:
        return f"expected arrays ['values'], got {sorted(arrays)}"
    values = arrays["values"]
    if values.dtype != np.float32:
        return f"values have dtype {values.dtype}, expected float32"
    if values.ndim != 1:
        return f"values have shape {values.shape}, expected a flat vector"
    if values.size > mask_positions:
        return f"{values.size} values for a mask of {mask_positions} positions: values outside the client's mask"
    if values.size != mask_positions:
        return f"{values.size} values for a mask of {mask_positions} positions"
    if not np.isfinite(values).all():
        return "non-finite values (NaN or Inf)"
    examples = metrics.get("examples")
    if not isinstance(examples, int | float) or examples < 0 or not float(examples).is_integer():
        return f"bad example count {examples!r}"
    if train_rows is not None and examples > train_rows:
        return f"claims {int(examples)} examples, more than the {train_rows} train rows it registered"
    loss = metrics.get("train_loss")
    if examples and (not isinstance(loss, int | float) or not math.isfinite(loss)):
        return f"bad train loss {loss!r}"
    return None


def mask_problem(mask_positions: int, budget: int) -> str | None:
    """Why a mask registered at search time is refused: it must hold exactly the client's budget."""
    if mask_positions != budget:
        return f"mask holds {mask_positions} positions, budget is {budget}"
    return None


def evaluation_problem(client: int, metrics: Mapping[str, Any]) -> str | None:
    """Why an evaluation reply is not counted: identity, a finite non-negative NLL, a token count."""
    claimed = metrics.get("client")
    if claimed is None or int(claimed) != client:
        return f"reply claims to be client {claimed!r}, sent to client {client}"
    nll, tokens = metrics.get("nll"), metrics.get("tokens")
    if not isinstance(nll, int | float) or not math.isfinite(nll) or nll < 0:
        return f"bad evaluation NLL {nll!r}"
    if not isinstance(tokens, int | float) or tokens < 0 or not float(tokens).is_integer():
        return f"bad evaluation token count {tokens!r}"
    count, total = metrics.get("rouge_l_count", 0), metrics.get("rouge_l_sum", 0.0)
    if not isinstance(count, int | float) or count < 0 or not 0 <= float(total) <= float(count):
        return f"bad ROUGE-L sum {total!r} over {count!r} answers"
    return None
