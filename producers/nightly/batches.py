"""Confirmed publishing of job batches, several awaiting their confirms at once.

``broker.publish`` returns only once a batch is durable; up to ``in_flight`` batches are
in flight so the producer is not held to one round trip per batch. What was confirmed
and what failed for good is tracked for the checkpoints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from common.brokers.base import ProducerBroker
from common.observability.metrics import ProducerMetrics
from common.schema import Job
from producers.nightly.rate_limit import TokenBucket

OnConfirmed = Callable[[list[Job]], None]


class ConfirmedBatches:
    """Batches published with up to ``in_flight`` awaiting their confirms."""

    def __init__(
        self,
        broker: ProducerBroker,
        *,
        ledger: str | None,
        in_flight: int,
        limiter: TokenBucket,
        metrics: ProducerMetrics,
        on_confirmed: OnConfirmed | None = None,
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        self._ledger = ledger
        self._slots = asyncio.Semaphore(in_flight)
        self._limiter = limiter
        self._on_confirmed = on_confirmed
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self.calls_since_mark = 0  # publish calls since the ledger was last marked
        self.unconfirmed_job_ids: list[str] = []  # of publishes that raised

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def submit(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self._raise_failure()
        await self._limiter.acquire(len(jobs))
        await self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            self._raise_failure()
        self.calls_since_mark += 1
        task = asyncio.create_task(self._publish(jobs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, jobs: list[Job]) -> None:
        # Failures are kept and re-raised from submit / drain in the run's own task.
        try:
            try:
                await self._broker.publish(jobs, ledger=self._ledger)
            except BaseException as exc:
                self.unconfirmed_job_ids += [job.job_id for job in jobs]
                self._fail(exc)
                return
            for op in {job.op for job in jobs}:
                published = self._metrics.jobs_published.labels(op.value)
                published.inc(sum(j.op is op for j in jobs))
            if self._on_confirmed is not None:
                try:
                    self._on_confirmed(jobs)
                except BaseException as exc:  # confirmed all the same
                    self._fail(exc)
        finally:
            self._slots.release()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc

    async def drain(self) -> None:
        """Wait until every submitted batch is confirmed; raise the first failure."""
        await self.settle()
        self._raise_failure()

    async def settle(self) -> None:
        """Wait until every submitted batch is confirmed or failed."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
