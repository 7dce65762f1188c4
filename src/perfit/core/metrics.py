"""The figures a run reports, from sums the clients send: perplexity."""

from __future__ import annotations

import math


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total NLL / total target tokens); NaN without tokens; inf past float range (a diverged
    model's mean NLL above about 709.8 nats a token)."""
    if not tokens:
        return float("nan")
    try:
        return math.exp(total_nll / tokens)
    except OverflowError:
        return float("inf")
