"""The one connect-retry loop: doubling waits, a deadline, failures it must not retry."""

from __future__ import annotations

import asyncio
import random

import pytest

from common.errors import ConfigError, Reason, TransientError
from common.retry import backoff_delay_s, retry_until


class _Flaky:
    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "up"


def test_retries_until_the_attempt_works_with_doubling_capped_waits() -> None:
    flaky = _Flaky(4, OSError("refused"))
    waits: list[float] = []
    result = asyncio.run(
        retry_until(
            flaky,
            retry_on=(OSError,),
            first_delay_s=0.01,
            max_delay_s=0.03,
            on_retry=lambda exc, wait_s, left_s: waits.append(wait_s),
        )
    )
    assert result == "up" and flaky.calls == 5
    assert waits == [0.01, 0.02, 0.03, 0.03]


def test_gives_up_after_the_deadline_with_the_last_failure() -> None:
    flaky = _Flaky(10**6, TransientError("down", Reason.BROKER))
    with pytest.raises(TransientError, match="down"):
        asyncio.run(
            retry_until(flaky, retry_on=(TransientError,), give_up_after_s=0.2, first_delay_s=0.05)
        )
    assert 3 <= flaky.calls <= 8  # waits of 0.05, 0.1, then the rest of the 0.2 s


def test_stop_on_and_unlisted_failures_are_raised_at_once() -> None:
    config = _Flaky(1, ConfigError("bad credentials"))
    with pytest.raises(ConfigError):
        asyncio.run(retry_until(config, retry_on=(Exception,), stop_on=(ConfigError,)))
    assert config.calls == 1
    other = _Flaky(1, ValueError("bug"))
    with pytest.raises(ValueError):
        asyncio.run(retry_until(other, retry_on=(OSError,)))
    assert other.calls == 1


def test_backoff_is_full_jitter_under_a_doubling_ceiling() -> None:
    rng = random.Random(7)
    delays = [backoff_delay_s(a, 1.0, 8.0, rng) for a in range(6) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert max(backoff_delay_s(0, 1.0, 8.0, rng) for _ in range(200)) <= 1.0
    assert max(delays) > 7.0
