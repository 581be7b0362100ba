"""A token bucket for the producer's publish rate (jobs per second), async.

Tokens refill at ``rate_per_s`` up to ``burst``; taking more than there are leaves the
bucket in debt and sleeps until the debt is paid, so a batch larger than the burst is
still sent whole and the long-run rate stays exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    def __init__(
        self,
        rate_per_s: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate_per_s < 0:
            raise ValueError("rate_per_s must not be negative")
        self.rate_per_s = rate_per_s
        self.burst = burst if burst is not None else max(rate_per_s, 1.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._updated_s = clock()
        self._lock = asyncio.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s == 0

    async def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` tokens, waiting as long as the rate asks; return the seconds waited."""
        if self.unlimited or n <= 0:
            return 0.0
        async with self._lock:  # callers are served in order, each paying its own debt
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._updated_s) * self.rate_per_s)
            self._updated_s = now
            self._tokens -= n
            if self._tokens >= 0:
                return 0.0
            wait_s = -self._tokens / self.rate_per_s
            await self._sleep(wait_s)
            return wait_s
