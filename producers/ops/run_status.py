"""A nightly run's progress as `imgfleet status` shows it: counts, rate and ETA.

The counts come from run accounting (segments and dead letters, composed by the CLI);
this module only turns them into a rate and an ETA and says where the rate came from:
two samples of a watch (the current speed) or the run's start time (the average).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

RATE_SINCE_START = "since_start"
RATE_BETWEEN_SAMPLES = "between_samples"


@dataclass(frozen=True)
class RunSample:
    settled: int  # indexed + dead-lettered
    at_s: float


@dataclass
class RunFigures:
    run_id: str
    state: str
    expected: int
    indexed: int
    failed: int
    started_at_s: float
    at_s: float
    # False while the producer is still publishing: ``expected`` is then a lower bound.
    expected_final: bool = True
    failures_by_reason: Counter[str] = field(default_factory=Counter)
    rate_per_s: float | None = None
    rate_source: str | None = None
    rate_window_s: float | None = None

    @property
    def settled(self) -> int:
        return self.indexed + self.failed

    @property
    def remaining(self) -> int:
        return max(self.expected - self.settled, 0)

    @property
    def eta_s(self) -> float | None:
        if self.remaining == 0:
            return 0.0
        if not self.rate_per_s or self.state == "finalized":
            return None
        return self.remaining / self.rate_per_s

    def sample(self) -> RunSample:
        return RunSample(self.settled, self.at_s)

    def with_rate(self, previous: RunSample | None) -> RunFigures:
        """Fill the rate: between ``previous`` and now when given, else since the start."""
        if previous is not None and self.at_s > previous.at_s:
            window_s = self.at_s - previous.at_s
            self.rate_per_s = max(self.settled - previous.settled, 0) / window_s
            self.rate_source = RATE_BETWEEN_SAMPLES
            self.rate_window_s = window_s
            return self
        elapsed_s = self.at_s - self.started_at_s
        self.rate_source = RATE_SINCE_START
        self.rate_window_s = None
        self.rate_per_s = self.settled / elapsed_s if elapsed_s > 0 else None
        return self

    def as_dict(self) -> dict[str, Any]:
        eta = self.eta_s
        return {
            "run_id": self.run_id,
            "state": self.state,
            "expected": self.expected,
            "expected_final": self.expected_final,
            "indexed": self.indexed,
            "failed": self.failed,
            "remaining": self.remaining,
            "failures_by_reason": dict(self.failures_by_reason.most_common()),
            "started_at_s": self.started_at_s,
            "rate_per_s": None if self.rate_per_s is None else round(self.rate_per_s, 3),
            "rate_source": self.rate_source,
            "rate_window_s": None if self.rate_window_s is None else round(self.rate_window_s, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }


def run_state(declared: str | None, *, finalized: bool, expected: int) -> str:
    """The run's state: what its run file says, else what its files imply."""
    if finalized:
        return "finalized"
    if declared:
        return declared
    # A run file is written with expected_jobs 0 before publishing and the count after.
    return "published" if expected > 0 else "publishing"
