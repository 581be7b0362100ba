"""A clock the test moves: code under test calls it for the time."""

from __future__ import annotations


class FakeClock:
    """``clock()`` is ``clock.now_s``, which the test sets or advances."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s
