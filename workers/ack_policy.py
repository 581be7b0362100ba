"""What happens to a job that failed: retry later, or dead-letter now.

Pure decisions, kept apart from the pipeline so the policy is unit-tested on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.errors import JobFailure, Reason, TransientError
from common.retry import at_least_s, backoff_delay_s

# Each backoff wait is drawn from [half, all] of its ceiling ("equal jitter"), not [0, all]:
# under full jitter 5 attempts spanned 3-15 s (median 7.5 s over 10^5 draws; 6-8 s in the
# adversarial run), so a short origin blip dead-lettered every image of that origin. A
# floor makes the budget predictable (broker.max_attempts), and half the ceiling still
# spreads a burst of retries over half of each step.
BACKOFF_MIN_FRACTION = 0.5


@dataclass(frozen=True)
class FailureOutcome:
    retry: bool
    reason: str
    error: str
    delay_s: float = 0.0
    # False: the job was not tried (its host is held off), so its attempt count stays.
    uses_attempt: bool = True


def classify(exc: BaseException) -> tuple[str, bool, str]:
    """(reason code, transient?, message) for any exception a stage raised."""
    if isinstance(exc, JobFailure):
        return exc.reason.value, exc.transient, exc.message
    # An unexpected exception is a bug, not a property of the image: retry it (a fix may be
    # deployed meanwhile) and dead-letter it as internal_error once attempts run out.
    return Reason.INTERNAL.value, True, f"{type(exc).__name__}: {exc}"


def decide(
    exc: BaseException,
    attempt: int,
    *,
    max_attempts: int,
    retry_base_s: float,
    retry_max_s: float,
    rng: random.Random | None = None,
) -> FailureOutcome:
    """``attempt`` is zero-based: the job has been tried ``attempt + 1`` times now.

    A transient failure that carries ``retry_after_s`` (the origin's Retry-After, already
    capped) waits at least that long, whatever the backoff says. One that was not tried at
    all (its host held off) is handed back for the end of the hold, as often as needed: a
    hold only exists while the origin answers with Retry-After, and each of those answers
    uses up an attempt of the job that got it.
    """
    reason, transient, message = classify(exc)
    retry_after_s = exc.retry_after_s if isinstance(exc, TransientError) else None
    if isinstance(exc, TransientError) and not exc.tried:
        delay_s = (
            at_least_s(retry_after_s, rng)
            if retry_after_s
            else backoff_delay_s(attempt, retry_base_s, retry_max_s, rng)
        )
        return FailureOutcome(True, reason, message, delay_s, uses_attempt=False)
    tries = attempt + 1
    if transient and tries < max_attempts:
        delay_s = backoff_delay_s(
            attempt, retry_base_s, retry_max_s, rng, min_fraction=BACKOFF_MIN_FRACTION
        )
        if retry_after_s is not None:
            delay_s = max(delay_s, at_least_s(retry_after_s, rng))
        return FailureOutcome(True, reason, message, delay_s)
    if transient:
        message = f"gave up after {tries} attempts: {message}"
    return FailureOutcome(False, reason, message)
