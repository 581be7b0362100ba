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


def delay_steps_ms(retry_base_s: float, retry_max_s: float, max_attempts: int) -> tuple[int, ...]:
    """One step per retry attempt of the exponential backoff, capped and de-duplicated."""
    steps: list[int] = []
    for attempt in range(max(max_attempts - 1, 0)):
        ms = round(min(retry_max_s, retry_base_s * 2**attempt) * 1000)
        if ms >= 1 and ms not in steps:
            steps.append(ms)
    return tuple(sorted(steps))
