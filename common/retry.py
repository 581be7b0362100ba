"""Retry timing: jittered exponential backoff."""

from __future__ import annotations

import random


def backoff_delay_s(
    attempt: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Full-jitter backoff: uniform in [0, min(max, base * 2**attempt)].

    Full jitter spreads the retries of a burst of failures (an origin that went down for
    everyone at once) instead of synchronising them into waves.
    """
    ceiling_s = min(max_s, base_s * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0.0, ceiling_s)
