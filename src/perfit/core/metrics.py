"""The figures a run reports, from sums the clients send: perplexity."""

from __future__ import annotations

import math


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total NLL / total target tokens); NaN without tokens."""
    return math.exp(total_nll / tokens) if tokens else float("nan")
