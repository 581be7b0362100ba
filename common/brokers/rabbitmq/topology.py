"""RabbitMQ queue names and arguments, declared the same way by producers and workers.

Everything goes through the default exchange with the queue name as routing key: there is
nothing to bind, so declaring the queues is the whole topology and declaring it twice is a
no-op. Retries park in per-step delay queues whose TTL dead-letters them back to the lane's
work queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

LANES = ("live", "bulk")  # consumption order: live first

QueueType = Literal["quorum", "classic"]


@dataclass(frozen=True)
class Topology:
    prefix: str
    queue_type: QueueType
    delay_steps_ms: tuple[int, ...]

    def work_queue(self, lane: str) -> str:
        return f"{self.prefix}.{lane}"

    def delay_queue(self, lane: str, step_ms: int) -> str:
        return f"{self.prefix}.delay.{lane}.{step_ms}ms"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dlq"

    def work_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": self.queue_type}

    def delay_arguments(self, lane: str, step_ms: int) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-message-ttl": step_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.work_queue(lane),
        }
        if self.queue_type == "quorum":
            # Quorum queues dead-letter at-most-once unless told otherwise; a retry lost
            # between the delay queue and the work queue would be a lost job.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    def all_queues(self) -> list[tuple[str, dict[str, Any]]]:
        queues = [(self.work_queue(lane), self.work_arguments()) for lane in LANES]
        for lane in LANES:
            queues += [
                (self.delay_queue(lane, ms), self.delay_arguments(lane, ms))
                for ms in self.delay_steps_ms
            ]
        queues.append((self.dead_letter_queue, self.work_arguments()))
        return queues

    def step_for(self, delay_s: float) -> int | None:
        """The delay queue for a wanted delay: the shortest step not below it.

        ``None`` means "no delay queue": the delay is under a millisecond. Delays beyond the
        longest step use the longest step (the backoff is capped there anyway).
        """
        delay_ms = round(delay_s * 1000)
        if delay_ms < 1 or not self.delay_steps_ms:
            return None
        for step in self.delay_steps_ms:
            if step >= delay_ms:
                return step
        return self.delay_steps_ms[-1]


def delay_steps_ms(
    retry_base_s: float, retry_max_s: float, max_attempts: int, longest_s: float = 0.0
) -> tuple[int, ...]:
    """One step per retry attempt of the exponential backoff, capped and de-duplicated.

    ``longest_s`` (``broker.retry_after_max_s``): steps beyond the backoff's up to that
    long, so a retry asked to wait longer (a Retry-After) is not sent back sooner. They
    halve down from ``longest_s``, at most ``_HOLD_STEPS`` of them: a wait between two
    steps waits at most twice as long as asked.
    """
    steps: list[int] = []
    for attempt in range(max(max_attempts - 1, 0)):
        ms = round(min(retry_max_s, retry_base_s * 2**attempt) * 1000)
        if ms >= 1 and ms not in steps:
            steps.append(ms)
    longest_backoff_ms = max(steps, default=0)
    ms = round(longest_s * 1000) if max_attempts > 1 else 0
    for _ in range(_HOLD_STEPS):
        if ms <= longest_backoff_ms:
            break
        steps.append(ms)
        ms //= 2
    return tuple(sorted(steps))


# Steps for Retry-After waits beyond the backoff's longest: with the defaults (backoff up
# to 64 s, waits up to 120 s) one; with a short test backoff, 5 queues per lane more, not
# one per doubling from 0.1 s.
_HOLD_STEPS = 5
