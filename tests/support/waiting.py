"""Polling helper for tests that watch other processes make progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.support.aio import take


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def take_deliveries(broker: Any, n: int, timeout_s: float = 10.0) -> list[Any]:
    """The next ``n`` deliveries of ``broker.consume()``, unsettled."""
    return await take(broker.consume(), n, timeout_s)
