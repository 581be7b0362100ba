"""Retry timing: jittered exponential backoff, ``Retry-After``, one retry-until-deadline loop.

``retry_until`` is the one connect-retry loop of the project (broker connects, the
worker's connect-with-give-up, the CMS intake's first connect): doubling waits up to a
cap, never sleeping past the deadline, and the last failure re-raised for the caller to
name (a transient broker error, an unrecoverable worker error).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# (the failure, the wait before the next attempt, seconds left before giving up)
OnRetry = Callable[[BaseException, float, float], None]


def backoff_delay_s(
    attempt: int,
    base_s: float,
    max_s: float,
    rng: random.Random | None = None,
    *,
    min_fraction: float = 0.0,
) -> float:
    """Jittered backoff: uniform in [min_fraction * ceiling, ceiling], where the ceiling is
    min(max, base * 2**attempt). ``min_fraction=0`` is full jitter, 0.5 "equal jitter".

    Jitter spreads the retries of a burst of failures (an origin that went down for
    everyone at once) instead of synchronising them into waves; a floor guarantees the
    retries of one job span a known minimum time.
    """
    ceiling_s = min(max_s, base_s * (2 ** max(attempt, 0)))
    return (rng or random).uniform(min_fraction * ceiling_s, ceiling_s)


# Retry-After's delay-seconds is 1*DIGIT (RFC 9110 10.2.3); a decimal fraction is accepted
# too, since some servers send one and its meaning is plain.
_DELAY_SECONDS = re.compile(r"\d{1,12}(?:\.\d+)?")


def parse_retry_after_s(value: str | None, *, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP-date).

    ``None`` for a missing or unreadable value; 0 for a date in the past. ``now_s`` is the
    wall-clock time (``time.time()``) an HTTP-date is measured from.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT (RFC 9110 5.6.7)
        when = when.replace(tzinfo=datetime.UTC)
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


def at_least_s(wanted_s: float, rng: random.Random | None = None) -> float:
    """A wait of no less than ``wanted_s``, spread up to 20 % beyond it.

    Jobs told to wait the same time (a burst that met one 429, the jobs held off behind it)
    would otherwise all come back in the same instant; the CMS client spreads the same way.
    """
    return wanted_s * (rng or random).uniform(1.0, 1.2)


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
