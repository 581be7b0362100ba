"""One worker process: consume -> fetch -> decode -> batch -> embed -> segment -> ack.

Every arrow is a bounded ``asyncio.Queue``; the broker's prefetch window bounds the whole, so
a slow stage pushes back to the broker and memory stays flat whatever the backlog.

Delivery contract kept here: a job is acked only after its vector is in a flushed segment
(or its failure is in the DLQ); a failing image fails alone, never its batch.

Operating signals: the settled-job counters of ``common.observability.metrics`` are
incremented here, once per job, right after the broker took its ack, retry or dead-letter;
every stage is timed; the embed stage reports to a ``common.observability.health`` stall
watch. A failure that no job caused (``UnrecoverableError``: the decode pool cannot be
restarted, consuming failed, a stage died) stops the worker without settling the jobs it
holds: they are handed back, and ``run`` raises so the process exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.brokers.base import Delivery, WorkerBroker
from common.config import BrokerConfig, WorkerConfig
from common.errors import (
    BadMessageError,
    ConfigError,
    JobFailure,
    PermanentError,
    Reason,
    UnrecoverableError,
)
from common.identity import content_hash
from common.observability.health import Health
from common.observability.logging import get_logger
from common.observability.metrics import UNKNOWN_LANE, Metrics, default_metrics
from common.observability.progress import Progress
from common.payload import encode_payload
from common.schema import Job, Op, decode_job
from index.routing import shard_for
from index.segments import SegmentWriter, VectorRecord
from workers.ack_policy import classify, decide
from workers.batcher import next_batch
from workers.decode.limits import IN_FLIGHT_PER_PROCESS
from workers.decode.types import Decoder
from workers.embed.types import Embedder
from workers.fetch.types import Fetcher
from workers.fetch.unchanged import KnownLookup, UnchangedImages

# The configuration's defaults (common.config), so a pipeline built without settings (tests,
# benchmarks) runs as an unconfigured worker would; the composition root maps the settings.
_WORKER = WorkerConfig()
_BROKER = BrokerConfig()


@dataclass(frozen=True)
class PipelineSettings:
    fetch_concurrency: int = _WORKER.fetch_concurrency
    decode_concurrency: int = IN_FLIGHT_PER_PROCESS  # one decode process kept busy
    max_batch: int = _WORKER.max_batch
    max_wait_s: float = _WORKER.max_wait_ms / 1000.0
    segment_max_records: int = _WORKER.segment_max_records
    segment_flush_interval_s: float = _WORKER.segment_flush_interval_s
    stage_queue_size: int = _WORKER.stage_queue_size
    max_attempts: int = _BROKER.max_attempts
    retry_base_s: float = _BROKER.retry_base_s
    retry_max_s: float = _BROKER.retry_max_s
    shutdown_deadline_s: float = _WORKER.shutdown_deadline_s
    # Truncated-but-recovered images: index, or dead-letter (worker.truncated_policy).
    index_recovered: bool = _WORKER.truncated_policy == "index"
    # A consume stream failing this long: unrecoverable (worker.broker_give_up_s).
    consume_give_up_s: float = _WORKER.broker_give_up_s


@dataclass
class WorkItem:
    delivery: Delivery
    job: Job
    data: bytes = b""  # raw bytes, held only until decoded
    content_hash: str = ""
    etag: str = ""
    last_modified: str = ""
    pixels: np.ndarray | None = None
    recovered: bool = False
    reused_vector: np.ndarray | None = None  # unchanged image: the stored vector


@dataclass(frozen=True)
class _Unflushed:
    """A job whose outcome is buffered in the segment writer, acked after the flush."""

    delivery: Delivery
    lane: str
    outcome: str  # indexed | unchanged | recovered | deleted


@dataclass
class WorkerStats:
    consumed: int = 0
    indexed: int = 0
    deleted: int = 0
    recovered: int = 0
    unchanged: int = 0  # indexed by reusing the stored vector (no decode, no embed)
    not_modified: int = 0  # of those, answered 304 to a conditional request
    retried: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    started_s: float = field(default_factory=time.monotonic)
    stopped_by: str = ""  # SIGTERM | SIGINT | idle | error (what ended the run)

    def as_dict(self) -> dict[str, Any]:
        elapsed_s = max(time.monotonic() - self.started_s, 1e-9)
        return {
            "consumed": self.consumed,
            "indexed": self.indexed,
            "deleted": self.deleted,
            "recovered": self.recovered,
            "unchanged": self.unchanged,
            "not_modified": self.not_modified,
            "retried": self.retried,
            "dead_lettered": dict(self.dead_lettered),
            "images_per_s": round(self.indexed / elapsed_s, 2),
            "stopped_by": self.stopped_by,
        }


class Worker:
    def __init__(
        self,
        broker: WorkerBroker,
        writer: SegmentWriter,
        fetcher: Fetcher,
        decoder: Decoder,
        embedder: Embedder,
        settings: PipelineSettings,
        *,
        worker_id: str = "worker",
        progress_total: int | None = None,
        on_flushed: Callable[[int], None] | None = None,
        known: KnownLookup | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.broker = broker
        self.writer = writer
        self.fetcher = fetcher
        self.decoder = decoder
        self.embedder = embedder
        self.settings = settings
        self.log = get_logger("worker", worker_id=worker_id)
        self.metrics = metrics or default_metrics()
        self.health = health or Health(stall_after_s=float("inf"))
        self._embed_watch = self.health.watch("embed")
        self.stats = WorkerStats()
        self.progress = Progress(self.log, "jobs", progress_total)
        self.on_flushed = on_flushed
        self.unchanged = UnchangedImages(known, embedder.model_id)
        size = settings.stage_queue_size
        self._fetch_q: asyncio.Queue[WorkItem] = asyncio.Queue(size)
        self._decode_q: asyncio.Queue[WorkItem] = asyncio.Queue(size)
        self._embed_q: asyncio.Queue[WorkItem] = asyncio.Queue(max(size, settings.max_batch))
        self._in_flight: dict[str, Delivery] = {}
        self._unflushed: list[_Unflushed] = []  # outcome buffered in the writer, not durable
        self._oldest_unflushed_s: float | None = None
        self._writer_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._fatal: UnrecoverableError | ConfigError | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------

    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Stop consuming and drain (what SIGTERM calls); ``reason`` ends up in the stats."""
        if not self._stop.is_set():
            self.log.info("stop requested; draining", stopped_by=reason)
            self.stats.stopped_by = reason
        self._stopping = True
        self.health.set_draining()
        self._stop.set()

    def fail(self, exc: UnrecoverableError | ConfigError) -> None:
        """The worker cannot go on: stop, hand back what it holds, and make ``run`` raise."""
        if self._fatal is None:
            self._fatal = exc
            self.log.error(
                "unrecoverable error; stopping",
                component=exc.component if isinstance(exc, UnrecoverableError) else "config",
                error=str(exc),
            )
        self.request_stop("error")

    def _watch_task(self, task: asyncio.Task[None], what: str, component: str) -> None:
        # A stage or the consumer ending with an exception would leave the worker alive
        # but doing nothing; that is unrecoverable, not something to wait out.
        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled() or self._stopping:
                return
            exc = finished.exception()
            if exc is None:
                return
            if isinstance(exc, UnrecoverableError | ConfigError):
                self.fail(exc)
                return
            failure = UnrecoverableError(f"{what} failed: {type(exc).__name__}: {exc}", component)
            failure.__cause__ = exc
            self.fail(failure)

        task.add_done_callback(done)

    async def run(self, *, until_idle: bool = False) -> WorkerStats:
        s = self.settings
        stages = [
            *(asyncio.create_task(self._fetch_stage()) for _ in range(s.fetch_concurrency)),
            *(asyncio.create_task(self._decode_stage()) for _ in range(s.decode_concurrency)),
            asyncio.create_task(self._embed_stage()),
            asyncio.create_task(self._flush_on_interval()),
        ]
        for task in stages:
            self._watch_task(task, "a pipeline stage", "pipeline")
        consumer = asyncio.create_task(self._consume())
        self._watch_task(consumer, "consuming from the broker", "broker")
        idle_watch = asyncio.create_task(self._stop_when_idle()) if until_idle else None
        try:
            await self._stop.wait()
        finally:
            self._stopping = True
            # One deadline for the whole stop: consumer cancel, in-flight work, flush.
            deadline_s = time.monotonic() + self.settings.shutdown_deadline_s
            await self._stop_consuming(consumer, deadline_s)
            if idle_watch:
                idle_watch.cancel()
            await self._drain(stages, deadline_s)
        self.progress.report(**self.stats.as_dict())
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    async def _stop_consuming(self, consumer: asyncio.Task[None], deadline_s: float) -> None:
        """Cancel the consumer; do not wait long for a broker that does not answer.

        Cancelling the consume stream cancels the broker-side consumers, which waits on a
        connection that may be gone (the very reason for stopping); a second cancel stops
        that wait, and the broker takes the unacked jobs back with the connection.
        """
        consumer.cancel()
        wait_s = max(min(5.0, deadline_s - time.monotonic()), 0.1)
        done, _ = await asyncio.wait({consumer}, timeout=wait_s)
        if not done:
            self.log.warning(
                "the broker did not answer the consumer cancel", waited_s=round(wait_s, 1)
            )
            consumer.cancel()
            await asyncio.wait({consumer}, timeout=1.0)
        if consumer.done() and not consumer.cancelled():
            consumer.exception()  # retrieved (the done callback already acted on it)

    async def _drain(self, stages: list[asyncio.Task[None]], deadline_s: float) -> None:
        """Finish in-flight work within the deadline, flush, ack, hand back the rest.

        After an unrecoverable error nothing is waited for: what is done is flushed and
        acked, the rest handed back at once.
        """
        while self._in_flight and time.monotonic() < deadline_s and self._fatal is None:
            unfinished = len(self._in_flight) - len(self._unflushed)
            if unfinished <= 0:
                break
            await asyncio.sleep(0.05)
        for task in stages:
            task.cancel()
        await asyncio.gather(*stages, return_exceptions=True)
        await self._flush()
        leftover = list(self._in_flight.values())
        if leftover:
            self.log.warning("handing back unfinished jobs", jobs=len(leftover))
            with contextlib.suppress(JobFailure):
                await self.broker.nack(leftover)
            self._in_flight.clear()
            self._track_in_flight()

    async def _stop_when_idle(self) -> None:
        quiet_checks = 0
        while not self._stop.is_set():
            await asyncio.sleep(0.25)
            try:
                busy = bool(self._in_flight) or await self.broker.pending() > 0
            except JobFailure as exc:  # the broker is away: not idle, just unknown
                self.log.debug("could not read the backlog", error=str(exc))
                busy = True
            quiet_checks = 0 if busy else quiet_checks + 1
            if quiet_checks >= 2:
                self.log.info("queue drained; stopping")
                self.request_stop("idle")

    # -- bookkeeping ----------------------------------------------------------------------

    def _context(self, job: Job) -> dict[str, Any]:
        """Log fields of one job: job, run, item, image and shard ids."""
        return {**job.log_context(), "shard": shard_for(job.image_id, self.writer.n_shards)}

    def _track_in_flight(self) -> None:
        self.metrics.in_flight_jobs.set(len(self._in_flight))

    def _settled(self, delivery: Delivery) -> None:
        self._in_flight.pop(delivery.delivery_id, None)
        self._track_in_flight()

    # -- stages -------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Take deliveries; a stream that fails (a connection lost while consumers were
        being registered, a Kafka poll thread that died) is opened again with backoff
        until it has failed for ``consume_give_up_s`` in a row."""
        failing_since_s: float | None = None
        delay_s = 0.5
        while True:
            stream = self.broker.consume()
            try:
                async for delivery in stream:
                    failing_since_s, delay_s = None, 0.5
                    try:
                        await self._take(delivery)
                    except Exception as exc:  # our bug, not the stream's: do not reopen
                        failure = UnrecoverableError(
                            f"taking a delivery failed: {type(exc).__name__}: {exc}", "pipeline"
                        )
                        failure.__cause__ = exc
                        self.fail(failure)
                        return
                return
            except Exception as exc:
                if isinstance(exc, JobFailure) and not exc.transient:
                    raise  # invalid settings or topology: waiting will not fix it
                now_s = time.monotonic()
                failing_since_s = failing_since_s or now_s
                if now_s - failing_since_s >= self.settings.consume_give_up_s:
                    raise
                self.log.warning(
                    "consuming failed; opening the stream again",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=delay_s,
                )
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)

    async def _take(self, delivery: Delivery) -> None:
        self._in_flight[delivery.delivery_id] = delivery
        self._track_in_flight()
        self.stats.consumed += 1
        try:
            job = decode_job(delivery.body)
        except BadMessageError as exc:
            self.metrics.jobs_consumed.labels(lane=UNKNOWN_LANE).inc()
            await self._fail(delivery, None, exc)
            return
        self.metrics.jobs_consumed.labels(lane=job.lane.value).inc()
        if job.op is Op.DELETE:
            await self._write([(WorkItem(delivery, job), None)])
            return
        await self._fetch_q.put(WorkItem(delivery, job))

    async def _fetch_stage(self) -> None:
        while True:
            item = await self._fetch_q.get()
            try:
                assert item.job.url is not None  # validated: upserts carry a url
                known = await self.unchanged.lookup(item.job.image_id)
                with self.metrics.time_stage("fetch"):
                    if known is None:
                        result = await self.fetcher.fetch(item.job.url)
                    else:
                        result = await self.fetcher.fetch(
                            item.job.url,
                            etag=known.etag or None,
                            last_modified=known.last_modified or None,
                        )
                not_modified = result.not_modified
                if not_modified and known is None:
                    raise PermanentError("HTTP 304 to an unconditional request", Reason.HTTP_4XX)
                item.content_hash = "" if not_modified else content_hash(result.data)
                item.etag = result.etag or ""
                item.last_modified = result.last_modified or ""
                reuse = self.unchanged.reuse(
                    known,
                    not_modified=not_modified,
                    content_hash=item.content_hash,
                    etag=item.etag,
                    last_modified=item.last_modified,
                )
                if reuse is None:
                    item.data = result.data
                else:
                    item.content_hash = reuse.content_hash
                    item.etag, item.last_modified = reuse.etag, reuse.last_modified
                    item.reused_vector = reuse.vector
                    self.stats.not_modified += int(not_modified)
            except UnrecoverableError as exc:
                self.fail(exc)  # not the job's fault: it is handed back, never settled
                continue
            except Exception as exc:  # one bad image never stops the stage
                await self._fail(item.delivery, item.job, exc)
                continue
            if item.reused_vector is not None:
                await self._write([(item, item.reused_vector)])
                continue
            await self._decode_q.put(item)

    async def _decode_stage(self) -> None:
        while True:
            item = await self._decode_q.get()
            try:
                with self.metrics.time_stage("decode"):
                    result = await self.decoder.decode(item.data)
                self.metrics.count_decode(
                    result.format or "unknown",
                    gpu=result.on_gpu,
                    recovered=result.recovered,
                    fallback=result.fallback,
                )
                if result.recovered and not self.settings.index_recovered:
                    raise PermanentError(
                        "truncated image (recoverable; policy is dead_letter)",
                        Reason.TRUNCATED,
                    )
                item.pixels = result.pixels
                item.recovered = result.recovered
                item.data = b""  # the compressed bytes are not needed past decode
            except UnrecoverableError as exc:
                self.fail(exc)
                continue
            except Exception as exc:
                await self._fail(item.delivery, item.job, exc)
                continue
            await self._embed_q.put(item)

    async def _embed_stage(self) -> None:
        s = self.settings
        while True:
            batch = await next_batch(
                self._embed_q,
                s.max_batch,
                s.max_wait_s,
                on_first=self._embed_watch.begin,  # from here the stage has work
                on_closed=lambda size, wait_s: self.metrics.observe_batch(
                    size, s.max_batch, wait_s
                ),
            )
            try:
                pixels = np.stack([item.pixels for item in batch])  # type: ignore[misc]
                with self.metrics.time_stage("embed"):
                    vectors = await asyncio.to_thread(self.embedder.embed, pixels)
            except Exception as exc:
                self._embed_watch.done()  # the batch is finished with, if not embedded
                # The model failed on the batch: retry each job alone, never fail them all
                # with one reason they may not share.
                self.log.error(
                    "embed failed",
                    error=str(exc),
                    batch=len(batch),
                    run_ids=sorted({item.job.run_id for item in batch}),
                )
                for item in batch:
                    await self._fail(item.delivery, item.job, exc)
                continue
            self._embed_watch.done()
            await self._write(list(zip(batch, vectors, strict=True)))

    async def _write(self, rows: list[tuple[WorkItem, np.ndarray | None]]) -> None:
        async with self._writer_lock:
            for item, vector in rows:
                job = item.job
                self.writer.add(
                    VectorRecord(
                        image_id=job.image_id,
                        item_id=job.item_id,
                        version=job.version,
                        content_hash=item.content_hash,
                        model_id=self.embedder.model_id,
                        vector=None if vector is None else vector.astype(np.float16),
                        etag=item.etag,
                        last_modified=item.last_modified,
                        run_id=job.run_id,
                        url=job.url or "",
                        payload=encode_payload(job.payload).decode(),
                    )
                )
                if vector is None:
                    self.stats.deleted += 1
                    outcome = "deleted"
                else:
                    self.stats.indexed += 1
                    self.stats.recovered += int(item.recovered)
                    self.stats.unchanged += int(item.reused_vector is not None)
                    outcome = (
                        "unchanged"
                        if item.reused_vector is not None
                        else "recovered"
                        if item.recovered
                        else "indexed"
                    )
                self._unflushed.append(_Unflushed(item.delivery, job.lane.value, outcome))
            if self._oldest_unflushed_s is None:
                self._oldest_unflushed_s = time.monotonic()
            full = self.writer.pending_count >= self.settings.segment_max_records
        if full:
            await self._flush()

    async def _flush_on_interval(self) -> None:
        interval_s = self.settings.segment_flush_interval_s
        while True:
            await asyncio.sleep(min(interval_s / 4, 0.5))
            oldest = self._oldest_unflushed_s
            if oldest is None:
                continue
            # Flush at once when everything in flight only waits for the flush (a drained
            # queue, a CMS trickle): waiting out the interval would only delay the acks.
            only_waiting = len(self._unflushed) >= len(self._in_flight)
            if only_waiting or time.monotonic() - oldest >= interval_s:
                await self._flush()

    async def _flush(self) -> None:
        async with self._writer_lock:
            if not self._unflushed:
                return
            try:
                with self.metrics.time_stage("segment_flush"):
                    keys = await asyncio.to_thread(self.writer.flush)
            except Exception as exc:
                # Nothing is acked; the buffer stays and the next flush tries again.
                self.log.error("segment flush failed; will retry", error=str(exc))
                return
            done, self._unflushed = self._unflushed, []
            self._oldest_unflushed_s = None
        deliveries = [entry.delivery for entry in done]
        try:
            with self.metrics.time_stage("ack"):
                await self.broker.ack(deliveries)
        except JobFailure as exc:
            # The outcomes are durable in segments; unacked, the jobs come back and their
            # replay changes nothing in the index.
            self.log.error("ack failed; the jobs will be redelivered", error=str(exc))
            for delivery in deliveries:
                self._settled(delivery)
            return
        for entry in done:
            self.metrics.jobs_acked.labels(lane=entry.lane, outcome=entry.outcome).inc()
            self._in_flight.pop(entry.delivery.delivery_id, None)
        self._track_in_flight()
        self.progress.advance(len(done))
        self.log.debug("flushed", segments=len(keys), jobs=len(done))
        if self.on_flushed:
            self.on_flushed(len(done))

    async def _fail(self, delivery: Delivery, job: Job | None, exc: BaseException) -> None:
        s = self.settings
        context = self._context(job) if job else {"delivery_id": delivery.delivery_id}
        try:
            if job is None:
                reason, _, message = classify(exc)
                await self.broker.dead_letter(delivery, reason, message, 1, None)
                self.stats.dead_lettered[reason] += 1
                self.metrics.jobs_dead_lettered.labels(reason=reason).inc()
                self.log.warning("dead-lettered", reason=reason, error=message, **context)
            else:
                outcome = decide(
                    exc,
                    job.attempt,
                    max_attempts=s.max_attempts,
                    retry_base_s=s.retry_base_s,
                    retry_max_s=s.retry_max_s,
                )
                if outcome.retry:
                    # A job held off (its host asked for a wait) was not tried: same attempt.
                    again = job.next_attempt() if outcome.uses_attempt else job
                    await self.broker.retry(delivery, again, outcome.delay_s)
                    self.stats.retried += 1
                    self.metrics.jobs_retried.labels(reason=outcome.reason).inc()
                    self.log.info(
                        "retry scheduled" if outcome.uses_attempt else "held off",
                        reason=outcome.reason,
                        delay_s=round(outcome.delay_s, 2),
                        attempt=again.attempt,
                        **context,
                    )
                else:
                    await self.broker.dead_letter(
                        delivery, outcome.reason, outcome.error, job.attempt + 1, job
                    )
                    self.stats.dead_lettered[outcome.reason] += 1
                    self.metrics.jobs_dead_lettered.labels(reason=outcome.reason).inc()
                    self.log.warning(
                        "dead-lettered",
                        reason=outcome.reason,
                        error=outcome.error,
                        **context,
                    )
        except JobFailure as broker_exc:
            # The outcome is not durable, so the job stays unacked and will be redelivered.
            self.log.error("could not settle failed job", error=str(broker_exc), **context)
            return
        self._settled(delivery)
        self.progress.advance(1)
