"""The broker protocol the pipeline talks to; adapters live beside it.

Outcomes are settled through the broker, not the delivery, so an adapter can batch them
(one multi-ack on RabbitMQ, one transaction on the local queue, one offset commit on Kafka).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from common.schema import Job


@dataclass
class Delivery:
    """One message handed to a consumer; ``token`` identifies this lease of it."""

    body: bytes
    delivery_id: str
    token: str
    redelivered: bool = False


@dataclass(frozen=True)
class DeadLetter:
    dlq_id: str
    body: bytes  # the original message, unchanged
    reason: str
    error: str
    attempts: int
    failed_at_s: float
    run_id: str | None
    item_id: str | None


@dataclass(frozen=True)
class LaneStats:
    """One lane's queue figures for `imgfleet status` and the queue gauges.

    ``unit`` says what ``ready`` counts: RabbitMQ counts messages (one may carry up to
    ``jobs_per_message`` jobs); the local broker and Kafka count jobs.
    """

    lane: str  # live | bulk | retry | dlq
    ready: int  # waiting to be delivered
    in_flight: int | None = None  # delivered, not settled (None: the broker cannot say)
    consumers: int | None = None
    lag: int | None = None  # Kafka: records the group has not committed
    unit: str = "jobs"


@runtime_checkable
class Broker(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, jobs: Sequence[Job]) -> None:
        """Return only once every job is durable on the broker."""
        ...

    async def publish_raw(self, bodies: Sequence[bytes], lane: str = "bulk") -> None:
        """Publish bodies as they are (ops tools and tests of malformed input)."""
        ...

    def consume(self) -> AsyncIterator[Delivery]:
        """Yield deliveries, at most ``prefetch`` unsettled at once."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    async def retry(self, delivery: Delivery, job: Job, delay_s: float) -> None:
        """Hand the job back for another attempt after ``delay_s`` (replaces the delivery)."""
        ...

    async def dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        error: str,
        attempts: int,
        job: Job | None,
    ) -> None:
        """Durably record the failure with its reason, then drop the delivery."""
        ...

    async def pending(self) -> int:
        """Jobs not yet settled, in flight or waiting (0 means the queue is drained)."""
        ...

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]: ...
