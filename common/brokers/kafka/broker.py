"""The Kafka adapter (kafka-python): the delivery contract with offsets instead of acks.

- Publishing: ``acks=all``, idempotence wherever the broker supports it (kafka-python's
  default), batches with linger; every delivery report is awaited, a failed send is sent
  again up to ``publish_attempts`` times and then raised, never dropped.
- Consuming: a consumer group polled by its own thread (``common.brokers.kafka.consumer``); an
  offset is committed once it and everything before it in its partition are settled.
- ``ack`` comes after the pipeline's segment flush; ``retry`` and ``dead_letter`` first
  wait for the broker to acknowledge the retry or DLQ record, then settle the delivery.
- A delivery whose partition was revoked and given to another consumer is *stale*: its
  outcome is not written (the new owner redoes the job) and its offset never committed.

The layout of topics and headers is in ``common.brokers.kafka.topics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from common.brokers.base import ActOnLetters, DeadLetter, Delivery, LaneStats, Pick
from common.brokers.kafka.client import ClientSettings, LogReader, ensure_topics
from common.brokers.kafka.consumer import ConsumerLoop
from common.brokers.kafka.dlq import KafkaLetter, collect_letters, resolution_value, resolved_keys
from common.brokers.kafka.ledger import LedgerReader, ledger_headers
from common.brokers.kafka.topics import (
    H_DUE_MS,
    RESOLVED_TOPIC_CONFIGS,
    RESOLVED_TOPIC_PARTITIONS,
    KafkaTopics,
    dlq_headers,
    due_at_ms,
)
from common.config import KafkaConfig
from common.errors import ConfigError, Reason, TransientError
from common.observability.logging import get_logger
from common.schema import Job

log = get_logger("kafka")

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class _Record:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


class KafkaBroker:
    def __init__(
        self,
        settings: ClientSettings,
        topics: KafkaTopics,
        kafka: KafkaConfig,
        *,
        prefetch: int = 256,
        publish_attempts: int = 3,
    ) -> None:
        if prefetch < 1:
            # A 0-job window pauses the bulk and retry partitions for good: nothing is
            # ever consumed from them (broker.prefetch = 0 stands for "the pipeline's
            # capacity", which the composition root computes and passes in).
            raise ConfigError(
                f"kafka: the consumer window (prefetch) must be at least 1 job, got {prefetch}"
            )
        self._settings = settings
        self.topics = topics
        self._kafka = kafka
        self._prefetch = prefetch
        self._publish_attempts = publish_attempts
        self._producer: KafkaProducer | None = None
        self._consumer: ConsumerLoop | None = None
        self._reader = LogReader(settings)
        self._reader_lock = threading.Lock()  # the reader's clients are not thread-safe
        self._records = asyncio.Event()

    def __repr__(self) -> str:
        # ClientSettings keeps credentials out of its repr; the bootstrap list has none.
        return f"KafkaBroker({self._settings.display!r}, prefix={self.topics.prefix!r})"

    # -- connection -------------------------------------------------------------------

    def is_connected(self) -> bool:
        """Connected, and once consuming, the poll thread is alive (kafka-python itself
        reconnects to brokers silently, so an outage shows as lost partitions instead)."""
        if self._producer is None:
            return False
        consumer = self._consumer
        return consumer is None or consumer.failure is None

    @property
    def assigned_partitions(self) -> int | None:
        """Partitions the group gave this consumer (None before consuming starts)."""
        consumer = self._consumer
        return None if consumer is None else consumer.assigned_partitions

    async def connect(self) -> None:
        if self._producer is None:
            await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        k = self._kafka
        try:
            admin = KafkaAdminClient(
                **self._settings.kwargs(
                    client_id="imgfleet-admin",
                    bootstrap_timeout_ms=int(k.connect_timeout_s * 1000),
                )
            )
            try:
                ensure_topics(admin, self.topics.all, k.partitions, k.replication_factor)
                ensure_topics(
                    admin,
                    [self.topics.dlq_resolved],
                    RESOLVED_TOPIC_PARTITIONS,
                    k.replication_factor,
                    configs=RESOLVED_TOPIC_CONFIGS,
                )
            finally:
                admin.close()
            # enable_idempotence is left to kafka-python: on where the broker supports it,
            # off (with a warning) where it does not.
            self._producer = KafkaProducer(
                **self._settings.kwargs(
                    acks="all",
                    linger_ms=k.linger_ms,
                    batch_size=k.batch_size_bytes,
                    max_in_flight_requests_per_connection=5,
                    client_id=f"imgfleet-producer-{os.getpid()}",
                )
            )
        except KafkaError as exc:
            raise TransientError(
                f"kafka: cannot connect to {self._settings.display}: {exc}", Reason.BROKER
            ) from exc
        log.info(
            "kafka connected",
            bootstrap=self._settings.display,
            prefix=self.topics.prefix,
            idempotent=bool(self._producer.config.get("enable_idempotence")),
        )

    async def close(self) -> None:
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.stop)
            self._consumer = None
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await asyncio.to_thread(producer.close, 30)
        with self._reader_lock:
            self._reader.close()

    # -- publishing -------------------------------------------------------------------

    async def publish(self, jobs: Sequence[Job], ledger: str | None = None) -> None:
        await self._send(
            [
                _Record(
                    self.topics.for_lane(job.lane.value),
                    job.item_id.encode(),
                    job.to_bytes(),
                    [] if ledger is None else ledger_headers(ledger, job.job_id),
                )
                for job in jobs
            ]
        )

    # -- publish ledger (common.brokers.kafka.ledger): the lane topics read from a mark -----------

    def ledger_capacity(self, batch_jobs: int) -> int | None:
        return None  # records stay until retention

    async def ledger_mark(self, ledger: str) -> dict[str, int]:
        if self._producer is None:
            await self.connect()  # the lane topics must exist
        lanes = (self.topics.live, self.topics.bulk)
        try:
            return await asyncio.to_thread(LedgerReader(self._settings).end_offsets, lanes)
        except KafkaError as exc:
            raise TransientError(f"kafka: ledger mark: {exc}", Reason.BROKER) from exc

    async def ledger_job_ids(self, ledger: str, since: dict[str, int] | None = None) -> set[str]:
        lanes = (self.topics.live, self.topics.bulk)
        try:
            return await asyncio.to_thread(
                LedgerReader(self._settings).job_ids, lanes, ledger, since
            )
        except KafkaError as exc:
            raise TransientError(f"kafka: reading ledger: {exc}", Reason.BROKER) from exc

    async def drop_ledger(self, ledger: str) -> None:
        return None  # nothing but the job records themselves was written

    async def publish_raw(self, bodies: Sequence[bytes], lane: str = "bulk") -> None:
        topic = self.topics.for_lane(lane)
        await self._send([_Record(topic, None, body, []) for body in bodies])

    async def _send(self, records: list[_Record]) -> None:
        """Return once the broker acknowledged every record (acks=all), or raise."""
        if not records:
            return
        if self._producer is None:
            await self.connect()
        todo = records
        error: BaseException | None = None
        for attempt in range(1, self._publish_attempts + 1):
            futures = await asyncio.to_thread(self._send_all, todo)
            outcomes = await _delivery_reports(futures)
            failed = [(rec, exc) for rec, exc in zip(todo, outcomes, strict=True) if exc]
            if not failed:
                return
            todo, error = [rec for rec, _ in failed], failed[0][1]
            log.warning(
                "kafka send failed; sending again",
                records=len(todo),
                attempt=attempt,
                error=str(error),
            )
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        raise TransientError(
            f"kafka: {len(todo)} records not acknowledged after {self._publish_attempts} "
            f"attempts: {error}",
            Reason.BROKER,
        )

    def _send_all(self, records: list[_Record]) -> list[Any]:
        producer = self._producer
        if producer is None:
            raise TransientError("kafka broker is closed", Reason.BROKER)
        futures: list[Any] = []
        for rec in records:
            try:
                futures.append(
                    producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers)
                )
            except KafkaError as exc:  # buffer full past max_block_ms, record too large...
                futures.append(exc)
        return futures

    # -- consuming --------------------------------------------------------------------

    def _make_consumer(self) -> KafkaConsumer:
        k = self._kafka
        return KafkaConsumer(
            **self._settings.kwargs(
                group_id=k.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",  # jobs published before the group existed
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_interval_ms=k.max_poll_interval_ms,
                max_poll_records=max(self._prefetch, k.live_prefetch),
                client_id=f"imgfleet-{socket.gethostname()}-{os.getpid()}",
            )
        )

    async def _consumer_loop(self) -> ConsumerLoop:
        if self._consumer is None:
            if self._producer is None:
                await self.connect()  # topics must exist before the group subscribes
            loop = asyncio.get_running_loop()
            event = self._records

            def wake() -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is closing
                    loop.call_soon_threadsafe(event.set)

            consumer = ConsumerLoop(
                self._make_consumer,
                self.topics,
                prefetch=self._prefetch,
                live_prefetch=self._kafka.live_prefetch,
                revoke_wait_s=self._kafka.revoke_wait_s,
                on_records=wake,
            )
            try:
                await asyncio.to_thread(consumer.start)
            except KafkaError as exc:
                raise TransientError(
                    f"kafka: consumer did not start: {exc}", Reason.BROKER
                ) from exc
            self._consumer = consumer
        return self._consumer

    async def consume(self) -> AsyncIterator[Delivery]:
        consumer = await self._consumer_loop()
        consumer.set_active(True)
        try:
            while True:
                self._records.clear()
                delivery = consumer.take()
                if delivery is not None:
                    yield delivery
                    continue
                if consumer.failure is not None:
                    raise TransientError(
                        f"kafka consumer stopped: {consumer.failure}", Reason.BROKER
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._records.wait(), timeout=1.0)
        finally:
            consumer.set_active(False)

    def _settle(self, deliveries: Sequence[Delivery], *, done: bool) -> None:
        if self._consumer is not None and deliveries:
            self._consumer.settle(deliveries, done=done)
            self._records.set()  # window room: buffered records may go out now

    def _is_current(self, delivery: Delivery) -> bool:
        return self._consumer is not None and self._consumer.is_current(delivery)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._settle(deliveries, done=True)

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        """Give deliveries back unfinished (shutdown): their offsets stay uncommitted."""
        self._settle(deliveries, done=False)

    async def retry(self, delivery: Delivery, job: Job, delay_s: float) -> None:
        if not self._is_current(delivery):
            self._settle([delivery], done=False)  # the partition's new owner redoes it
            return
        due_ms = due_at_ms(delay_s)
        await self._send(
            [
                _Record(
                    self.topics.retry_topic(delay_s),
                    job.item_id.encode(),
                    job.to_bytes(),
                    [(H_DUE_MS, str(due_ms).encode())],
                )
            ]
        )
        self._settle([delivery], done=True)

    async def dead_letter(
        self, delivery: Delivery, reason: str, error: str, attempts: int, job: Job | None
    ) -> None:
        if not self._is_current(delivery):
            self._settle([delivery], done=False)
            return
        headers = dlq_headers(
            reason=reason,
            error=error,
            attempts=attempts,
            failed_at_s=time.time(),
            run_id=job.run_id if job else None,
            item_id=job.item_id if job else None,
            source=delivery.delivery_id,
        )
        key = job.item_id.encode() if job else None
        # The value is the record as it arrived, byte for byte (malformed ones included).
        await self._send([_Record(self.topics.dlq, key, delivery.body, headers)])
        self._settle([delivery], done=True)

    # -- inspection -------------------------------------------------------------------

    async def pending(self) -> int:
        """Records of the group's topics not committed yet: in flight, waiting, or due later."""
        return await asyncio.to_thread(self._locked_read, "backlog")

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """The DLQ read from its start without a group (reading it changes nothing).

        Letters ops requeued or purged (marked in the resolved topic) are left out.
        """
        letters = await asyncio.to_thread(self._unresolved_letters)
        return [entry.letter for entry in letters[:limit]]

    def _unresolved_letters(self) -> list[KafkaLetter]:
        records = self._locked_read("dlq", 10**12)
        resolved = resolved_keys(self._locked_read("resolved", 10**12))
        return collect_letters(records, resolved)

    async def settle_dead_letters(
        self, select: Pick, act: ActOnLetters, *, limit: int | None = None, batch_size: int = 500
    ) -> int:
        """Mark acted-on letters in the resolved topic (records cannot be deleted)."""
        letters = await asyncio.to_thread(self._unresolved_letters)
        settled = 0
        batch: list[KafkaLetter] = []

        async def flush() -> None:
            nonlocal settled
            if not batch:
                return
            await act([entry.letter for entry in batch])
            value = resolution_value("settled", time.time())
            await self._send(
                [
                    _Record(self.topics.dlq_resolved, key.encode(), value, [])
                    for entry in batch
                    for key in entry.record_keys
                ]
            )
            settled += len(batch)
            batch.clear()

        for entry in letters:
            if limit is not None and settled + len(batch) >= limit:
                break
            if not select(entry.letter):
                continue
            batch.append(entry)
            if len(batch) >= batch_size:
                await flush()
        await flush()
        return settled

    async def lane_stats(self) -> list[LaneStats]:
        """Lag of the workers' group per lane (records not committed: waiting or in flight)."""
        return await asyncio.to_thread(self._locked_read, "stats")

    def _lane_stats(self) -> list[LaneStats]:
        reader, topics = self._reader, self.topics
        lag = reader.lag(self._kafka.group_id, topics.consumed)

        def of(names: tuple[str, ...]) -> int:
            return sum(n for tp, n in lag.items() if tp.topic in names)

        members = reader.group_members(self._kafka.group_id)
        stats = [
            LaneStats(lane, of(names), consumers=members, lag=of(names))
            for lane, names in (
                ("live", (topics.live,)),
                ("bulk", (topics.bulk,)),
                ("retry", topics.retries),
            )
        ]
        resolved = resolved_keys(reader.read(topics.dlq_resolved, 10**12))
        # DLQ records minus the settled ones; copies of one job count as records here.
        stats.append(LaneStats("dlq", max(reader.records(topics.dlq) - len(resolved), 0)))
        return stats

    def _locked_read(self, what: str, limit: int = 0) -> Any:
        try:
            with self._reader_lock:
                if what == "backlog":
                    return self._reader.backlog(self._kafka.group_id, self.topics.consumed)
                if what == "stats":
                    return self._lane_stats()
                if what == "resolved":
                    return self._reader.read(self.topics.dlq_resolved, limit)
                return self._reader.read(self.topics.dlq, limit)
        except KafkaError as exc:
            raise TransientError(f"kafka: {what}: {exc}", Reason.BROKER) from exc


async def _delivery_reports(futures: list[Any]) -> list[BaseException | None]:
    """Await kafka-python futures (completed on its sender thread): None or the error."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    outcomes: list[BaseException | None] = [None] * len(futures)
    remaining = [len(futures)]
    lock = threading.Lock()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def report(index: int, value: Any) -> None:
        if isinstance(value, BaseException):
            outcomes[index] = value
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            loop.call_soon_threadsafe(finished)

    for index, future in enumerate(futures):
        if isinstance(future, BaseException):
            report(index, future)
        else:
            future.add_both(report, index)
    await done
    return outcomes
