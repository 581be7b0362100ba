"""The broker's roles, one small protocol each; every adapter implements all of them.

A consumer of the broker is typed against the roles it uses, not against everything an
adapter can do: the worker consumes and settles (``Consumer``) and watches the link
(``QueueInspector``); a producer publishes with a ledger (``Publisher``, ``PublishLedger``);
the CMS intake publishes and probes; ops tools read and settle dead letters
(``DeadLetterStore``) and lane figures. ``Broker`` is all of them together: only the
composition root, which builds adapters, and adapter tests name it.

Outcomes are settled through the broker, not the delivery, so an adapter can batch them
(one multi-ack on RabbitMQ, one transaction on the local queue, one offset commit on Kafka).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


# Ops tools settle dead letters through these: ``select`` picks letters, ``act`` makes their
# outcome durable elsewhere (a confirmed republish, an archive file) before they go.
Pick = Callable[[DeadLetter], bool]  # picks the letters to settle
ActOnLetters = Callable[[list[DeadLetter]], Awaitable[None]]


# Where a publish ledger stood at a checkpoint (Kafka: "topic:partition" -> end offset;
# the local queue: its mark epoch; RabbitMQ: nothing, its ledger is bounded by length).
LedgerPosition = dict[str, int]


class Connection(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...


class Publisher(Connection, Protocol):
    async def publish(self, jobs: Sequence[Job], ledger: str | None = None) -> None:
        """Return only once every job is durable on the broker.

        With ``ledger``, each job's id also goes into that publish ledger atomically with
        the job itself, so after a crash a job is in the ledger exactly when it is on the
        broker (see ``PublishLedger.ledger_job_ids``).
        """
        ...


class PublishLedger(Protocol):
    def ledger_capacity(self, batch_jobs: int) -> int | None:
        """``publish`` calls of up to ``batch_jobs`` jobs a ledger surely keeps between two
        ``ledger_mark`` calls (None: no bound)."""
        ...

    async def ledger_mark(self, ledger: str) -> LedgerPosition:
        """Mark a resume point, with no publish to ``ledger`` in flight; creates the ledger.

        The position goes into the producer's checkpoint: ``ledger_job_ids(ledger, since=it)``
        then covers every job published after the mark.
        """
        ...

    async def ledger_job_ids(self, ledger: str, since: LedgerPosition | None = None) -> set[str]:
        """Ids of the jobs published with ``ledger`` since the mark ``since`` (or a superset)."""
        ...

    async def drop_ledger(self, ledger: str) -> None:
        """Forget the ledger once its run is published (a missing ledger is fine)."""
        ...


class Consumer(Connection, Protocol):
    def consume(self) -> AsyncIterator[Delivery]:
        """Yield deliveries, at most ``prefetch`` unsettled at once."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back untouched for immediate redelivery (the shutdown path)."""
        ...

    async def retry(self, delivery: Delivery, job: Job, delay_s: float) -> None:
        """Hand the job back for another attempt after ``delay_s`` (replaces the delivery)."""
        ...

    async def dead_letter(
        self, delivery: Delivery, reason: str, error: str, attempts: int, job: Job | None
    ) -> None:
        """Durably record the failure with its reason, then drop the delivery."""
        ...


class DeadLetterStore(Connection, Protocol):
    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]: ...

    async def settle_dead_letters(
        self, select: Pick, act: ActOnLetters, *, limit: int | None = None, batch_size: int = 500
    ) -> int:
        """Remove the dead letters ``select`` picks, each only after ``act`` returned on it.

        Selected letters go to ``act`` in batches of up to ``batch_size``; a batch leaves the
        DLQ once ``act`` has returned (if it raises, that batch stays and the error
        propagates). Letters not selected stay where they are, in order. Copies of one
        letter that ``dead_letters`` collapses are removed together. Returns the number of
        letters removed (at most ``limit``).
        """
        ...


class QueueInspector(Protocol):
    async def pending(self) -> int:
        """Jobs not yet settled, in flight or waiting (0 means the queue is drained)."""
        ...

    async def lane_stats(self) -> list[LaneStats]:
        """Queue figures per lane (live, bulk, retry, dlq) as far as the broker can tell."""
        ...

    def is_connected(self) -> bool:
        """The adapter's own view of its link (False while a reconnect is under way)."""
        ...

    @property
    def assigned_partitions(self) -> int | None:
        """Kafka: partitions the group gave this consumer (0: a surplus member with no
        work; None before consuming starts). Brokers without assignment: None."""
        ...


@runtime_checkable
class Broker(Publisher, PublishLedger, Consumer, DeadLetterStore, QueueInspector, Protocol):
    """Every role: what an adapter implements and the composition root hands out."""


class WorkerBroker(Consumer, QueueInspector, Protocol):
    """What a worker uses: consume and settle, and watch the link and the backlog."""


class ProducerBroker(Publisher, PublishLedger, Protocol):
    """What a nightly run uses: publish with a resume ledger."""


class IntakeBroker(Publisher, QueueInspector, Protocol):
    """What the CMS intake uses: publish with confirms, and probe the link for /readyz."""


class OpsBroker(DeadLetterStore, Publisher, QueueInspector, Protocol):
    """What ops commands use: read and settle dead letters, republish, read lane figures."""
