import random

from common.errors import PermanentError, Reason, TransientError
from common.retry import backoff_delay_s
from workers.ack_policy import decide

POLICY = {"max_attempts": 3, "retry_base_s": 1.0, "retry_max_s": 10.0}


def test_transient_retries_until_the_limit_then_dead_letters() -> None:
    exc = TransientError("503", Reason.HTTP_5XX)
    assert decide(exc, 0, **POLICY).retry
    assert decide(exc, 1, **POLICY).retry
    final = decide(exc, 2, **POLICY)
    assert not final.retry and final.reason == "http_5xx"
    assert "gave up after 3 attempts" in final.error


def test_permanent_goes_straight_to_dlq_and_bugs_are_internal() -> None:
    out = decide(PermanentError("gone", Reason.HTTP_404), 0, **POLICY)
    assert (out.retry, out.reason) == (False, "http_404")
    bug = decide(KeyError("x"), 0, **POLICY)
    assert bug.retry and bug.reason == "internal_error"


def test_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay_s(a, 1.0, 10.0, rng) for a in range(12)]
    assert all(0 <= d <= 10.0 for d in delays)
    assert len(set(delays)) == len(delays)
    assert max(backoff_delay_s(0, 1.0, 10.0, rng) for _ in range(200)) <= 1.0


def test_retry_waits_have_a_floor_so_the_budget_is_predictable() -> None:
    rng = random.Random(5)
    exc = TransientError("503", Reason.HTTP_5XX)
    policy = {"max_attempts": 8, "retry_base_s": 1.0, "retry_max_s": 300.0}
    budgets = [sum(decide(exc, a, **policy, rng=rng).delay_s for a in range(7)) for _ in range(300)]
    # Waits of [half, all] of 1, 2, ... 64 s: a job's retries span 63.5-127 s.
    assert min(budgets) >= 63.5 and max(budgets) <= 127.0
