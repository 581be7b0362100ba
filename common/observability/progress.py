"""Periodic progress lines with rate and ETA for long work."""

from __future__ import annotations

import time
from typing import Any


class Progress:
    """Logs ``done/total``, rate and ETA at most every ``interval_s`` seconds."""

    def __init__(self, log: Any, what: str, total: int | None, interval_s: float = 2.0) -> None:
        self.log = log
        self.what = what
        self.total = total
        self.interval_s = interval_s
        self.done = 0
        self.started_s = time.monotonic()
        self._last_report_s = self.started_s

    def advance(self, n: int = 1, **extra: Any) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last_report_s >= self.interval_s:
            self._last_report_s = now
            self.report(**extra)

    @property
    def rate_per_s(self) -> float:
        elapsed_s = max(time.monotonic() - self.started_s, 1e-9)
        return self.done / elapsed_s

    def eta_s(self) -> float | None:
        if self.total is None or self.rate_per_s <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate_per_s

    def report(self, **extra: Any) -> None:
        eta = self.eta_s()
        self.log.info(
            "progress",
            what=self.what,
            done=self.done,
            total=self.total,
            rate_per_s=round(self.rate_per_s, 1),
            eta_s=None if eta is None else round(eta, 1),
            **extra,
        )
