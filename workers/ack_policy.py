"""What happens to a job that failed: retry later, or dead-letter now.

Pure decisions, kept apart from the pipeline so the policy is unit-tested on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.errors import JobFailure, Reason
from common.retry import backoff_delay_s


@dataclass(frozen=True)
class FailureOutcome:
    retry: bool
    reason: str
    error: str
    delay_s: float = 0.0


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
    """``attempt`` is zero-based: the job has been tried ``attempt + 1`` times now."""
    reason, transient, message = classify(exc)
    tries = attempt + 1
    if transient and tries < max_attempts:
        delay_s = backoff_delay_s(attempt, retry_base_s, retry_max_s, rng)
        return FailureOutcome(True, reason, message, delay_s)
    if transient:
        message = f"gave up after {tries} attempts: {message}"
    return FailureOutcome(False, reason, message)
