"""Retry timing: jittered exponential backoff, and one retry-until-deadline loop.

``retry_until`` is the one connect-retry loop of the project (broker connects, the
worker's connect-with-give-up, the CMS intake's first connect): doubling waits up to a
cap, never sleeping past the deadline, and the last failure re-raised for the caller to
name (a transient broker error, an unrecoverable worker error).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# (the failure, the wait before the next attempt, seconds left before giving up)
OnRetry = Callable[[BaseException, float, float], None]


def backoff_delay_s(
    attempt: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Full-jitter backoff: uniform in [0, min(max, base * 2**attempt)].

    Full jitter spreads the retries of a burst of failures (an origin that went down for
    everyone at once) instead of synchronising them into waves.
    """
    ceiling_s = min(max_s, base_s * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0.0, ceiling_s)


async def retry_until(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    stop_on: tuple[type[BaseException], ...] = (),
    give_up_after_s: float | None = None,
    first_delay_s: float = 1.0,
    max_delay_s: float = 10.0,
    on_retry: OnRetry | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Await ``attempt()`` until it returns, retrying the failures in ``retry_on``.

    Waits double from ``first_delay_s`` up to ``max_delay_s``. With ``give_up_after_s``
    the last failure is re-raised once that long has passed (a wait never runs past it);
    without, it retries for ever. ``stop_on`` failures (refused credentials, invalid
    settings: waiting will not fix them) are raised at once even if ``retry_on`` covers
    them. A connect loop doubles without jitter: one process retries one server, so there
    is no burst to spread.
    """
    deadline_s = math.inf if give_up_after_s is None else clock() + give_up_after_s
    delay_s = first_delay_s
    while True:
        try:
            return await attempt()
        except stop_on:
            raise
        except retry_on as exc:
            left_s = deadline_s - clock()
            if left_s <= 0:
                raise
            wait_s = min(delay_s, left_s)
            if on_retry is not None:
                on_retry(exc, wait_s, left_s)
            await asyncio.sleep(wait_s)
            delay_s = min(delay_s * 2, max_delay_s)
