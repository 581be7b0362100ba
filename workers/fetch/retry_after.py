"""Retry-After: how long an origin asked us to wait, and which origins are held off.

Pure policy, no I/O: the HTTP fetcher reads the header through ``hold_s``, notes the hold
in a ``HostHolds`` table, and asks the table before every request. A 429 or 503 with
``Retry-After`` holds off the whole origin (scheme, host and port), not only the job that
got it: the other jobs for that origin wait too instead of hammering it, and jobs for other
origins are not delayed. The table is per worker process; each worker learns a hold from
its own first answer.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from common.retry import parse_retry_after_s

# The statuses whose Retry-After says "not before" (RFC 9110 10.2.3; 3xx use it otherwise).
RETRY_AFTER_STATUSES = frozenset({429, 503})
# Enough for every origin of a catalogue at once; past it expired holds are dropped, then
# the ones ending soonest (a lost hold costs one extra request, not a failure).
MAX_HOSTS = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, lower-cased, without user info (the table's key)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    host = (parts.hostname or "").lower()
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS.get(scheme, 0)}"


def hold_s(
    status: int, retry_after: str | None, max_s: float, *, now_s: float | None = None
) -> float | None:
    """How long to hold off after this answer: its Retry-After capped at ``max_s``.

    ``None`` when there is nothing to honour: another status, no or an unreadable
    header, a zero wait, or ``max_s`` 0 (Retry-After switched off). ``now_s`` is the
    wall-clock time an HTTP-date is measured from.
    """
    if status not in RETRY_AFTER_STATUSES or max_s <= 0:
        return None
    asked_s = parse_retry_after_s(retry_after, now_s=now_s)
    if asked_s is None or asked_s <= 0:
        return None
    return min(asked_s, max_s)


@dataclass(frozen=True)
class Hold:
    left_s: float  # how much longer the origin is held off
    status: int  # the answer that asked for it (429 or 503)


class HostHolds:
    """Origins held off until a monotonic time, and the status that asked for it."""

    def __init__(
        self, *, max_hosts: int = MAX_HOSTS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_hosts < 1:
            raise ValueError("max_hosts must be >= 1")
        self._max_hosts = max_hosts
        self._clock = clock
        self._until: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def hold(self, origin: str, seconds: float, status: int) -> None:
        """Hold ``origin`` off for ``seconds`` from now; an existing longer hold stays.

        Answers to requests sent together arrive together; the longest wait any of them
        asked for is the one to keep.
        """
        if seconds <= 0:
            return
        now = self._clock()
        until = now + seconds
        current = self._until.get(origin)
        if current is not None and current[0] >= until:
            return
        self._until[origin] = (until, status)
        if len(self._until) > self._max_hosts:
            self._shrink(now)

    def held(self, origin: str) -> Hold | None:
        """The hold on ``origin`` now, or ``None`` if it may be asked."""
        entry = self._until.get(origin)
        if entry is None:
            return None
        left_s = entry[0] - self._clock()
        if left_s <= 0:
            del self._until[origin]
            return None
        return Hold(left_s, entry[1])

    def _shrink(self, now: float) -> None:
        for origin in [o for o, (until, _) in self._until.items() if until <= now]:
            del self._until[origin]
        excess = len(self._until) - self._max_hosts
        if excess > 0:
            soonest = sorted(self._until, key=lambda o: self._until[o][0])[:excess]
            for origin in soonest:
                del self._until[origin]
