"""The one connect-retry loop: doubling waits, a deadline, failures it must not retry."""

from __future__ import annotations

import asyncio
import email.utils
import random

import pytest

from common.errors import ConfigError, Reason, TransientError
from common.retry import at_least_s, backoff_delay_s, parse_retry_after_s, retry_until


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


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now_s = 1_700_000_000.0
    assert parse_retry_after_s("120") == 120.0
    assert parse_retry_after_s(" 2.5 ") == 2.5
    date = email.utils.formatdate(now_s + 90, usegmt=True)  # "Tue, 14 Nov 2023 22:14:50 GMT"
    assert parse_retry_after_s(date, now_s=now_s) == pytest.approx(90.0)
    assert parse_retry_after_s(email.utils.formatdate(now_s - 90, usegmt=True), now_s=now_s) == 0
    # RFC 850 and asctime dates are HTTP-dates too (RFC 9110 5.6.7).
    assert parse_retry_after_s("Sunday, 06-Nov-94 08:49:37 GMT", now_s=784111777.0) == 0.0
    assert parse_retry_after_s("Sun Nov  6 08:49:37 1994", now_s=784111777.0 - 5) == 5.0
    for unreadable in (None, "", "  ", "soon", "-1", "1e3", "inf", "nan", "12 s"):
        assert parse_retry_after_s(unreadable) is None, unreadable


def test_a_backoff_floor_keeps_the_spread_above_it() -> None:
    rng = random.Random(2)
    delays = [backoff_delay_s(3, 1.0, 300.0, rng, min_fraction=0.5) for _ in range(500)]
    assert min(delays) >= 4.0 and max(delays) <= 8.0
    assert max(delays) - min(delays) > 3.0  # still spread over the upper half
    assert at_least_s(10.0, rng) >= 10.0
    assert max(at_least_s(10.0, rng) for _ in range(200)) <= 12.0
