"""One worker process: consume -> fetch -> decode -> batch -> embed -> segment -> ack.

Every arrow is a bounded ``asyncio.Queue``; the broker's prefetch window bounds the whole, so
a slow stage pushes back to the broker and memory stays flat whatever the backlog.

Delivery contract kept here: a job is acked only after its vector is in a flushed segment
(or its failure is in the DLQ); a failing image fails alone, never its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.broker import Broker, Delivery
from common.errors import BadMessageError, ImgfleetError, PermanentError, Reason
from common.identity import content_hash
from common.logging import get_logger
from common.progress import Progress
from common.schema import Job, Op, decode_job
from index.segments import SegmentWriter, VectorRecord
from workers.ack_policy import classify, decide
from workers.batcher import next_batch
from workers.unchanged import KnownLookup, UnchangedImages


class FetcherLike(Protocol):
    # Called with etag= / last_modified= only for images the index already holds, so a
    # fetcher that never sees known images may take just the url.
    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> Any: ...


class DecoderLike(Protocol):
    async def decode(self, data: bytes) -> Any: ...


class EmbedderLike(Protocol):
    model_id: str

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PipelineSettings:
    fetch_concurrency: int = 32
    decode_concurrency: int = 4
    max_batch: int = 32
    max_wait_s: float = 0.05
    segment_max_records: int = 512
    segment_flush_interval_s: float = 2.0
    stage_queue_size: int = 64
    max_attempts: int = 5
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    shutdown_deadline_s: float = 30.0
    index_recovered: bool = True  # truncated-but-recovered images: index, or dead-letter


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
        }


class Worker:
    def __init__(
        self,
        broker: Broker,
        writer: SegmentWriter,
        fetcher: FetcherLike,
        decoder: DecoderLike,
        embedder: EmbedderLike,
        settings: PipelineSettings,
        *,
        worker_id: str = "worker",
        progress_total: int | None = None,
        on_flushed: Callable[[int], None] | None = None,
        known: KnownLookup | None = None,
    ) -> None:
        self.broker = broker
        self.writer = writer
        self.fetcher = fetcher
        self.decoder = decoder
        self.embedder = embedder
        self.settings = settings
        self.log = get_logger("worker", worker_id=worker_id)
        self.stats = WorkerStats()
        self.progress = Progress(self.log, "jobs", progress_total)
        self.on_flushed = on_flushed
        self.unchanged = UnchangedImages(known, embedder.model_id)
        size = settings.stage_queue_size
        self._fetch_q: asyncio.Queue[WorkItem] = asyncio.Queue(size)
        self._decode_q: asyncio.Queue[WorkItem] = asyncio.Queue(size)
        self._embed_q: asyncio.Queue[WorkItem] = asyncio.Queue(max(size, settings.max_batch))
        self._in_flight: dict[str, Delivery] = {}
        self._unflushed: list[Delivery] = []  # outcome buffered in the writer, not yet durable
        self._oldest_unflushed_s: float | None = None
        self._writer_lock = asyncio.Lock()
        self._stop = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop consuming and drain (what SIGTERM calls)."""
        if not self._stop.is_set():
            self.log.info("stop requested; draining")
        self._stop.set()

    async def run(self, *, until_idle: bool = False) -> WorkerStats:
        s = self.settings
        stages = [
            *(asyncio.create_task(self._fetch_stage()) for _ in range(s.fetch_concurrency)),
            *(asyncio.create_task(self._decode_stage()) for _ in range(s.decode_concurrency)),
            asyncio.create_task(self._embed_stage()),
            asyncio.create_task(self._flush_on_interval()),
        ]
        consumer = asyncio.create_task(self._consume())
        idle_watch = asyncio.create_task(self._stop_when_idle()) if until_idle else None
        try:
            await self._stop.wait()
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            if idle_watch:
                idle_watch.cancel()
            await self._drain(stages)
        self.progress.report(**self.stats.as_dict())
        return self.stats

    async def _drain(self, stages: list[asyncio.Task[None]]) -> None:
        """Finish in-flight work within the deadline, flush, ack, hand back the rest."""
        deadline_s = time.monotonic() + self.settings.shutdown_deadline_s
        while self._in_flight and time.monotonic() < deadline_s:
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
            nack = getattr(self.broker, "nack", None)
            if nack is not None:
                with contextlib.suppress(ImgfleetError):
                    await nack(leftover)
            self._in_flight.clear()

    async def _stop_when_idle(self) -> None:
        quiet_checks = 0
        while not self._stop.is_set():
            await asyncio.sleep(0.25)
            busy = bool(self._in_flight) or await self.broker.pending() > 0
            quiet_checks = 0 if busy else quiet_checks + 1
            if quiet_checks >= 2:
                self.log.info("queue drained; stopping")
                self._stop.set()

    # -- stages -------------------------------------------------------------------------

    async def _consume(self) -> None:
        stream = self.broker.consume()
        try:
            async for delivery in stream:
                self._in_flight[delivery.delivery_id] = delivery
                self.stats.consumed += 1
                try:
                    job = decode_job(delivery.body)
                except BadMessageError as exc:
                    await self._fail(delivery, None, exc)
                    continue
                if job.op is Op.DELETE:
                    await self._write([(WorkItem(delivery, job), None)])
                    continue
                await self._fetch_q.put(WorkItem(delivery, job))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _fetch_stage(self) -> None:
        while True:
            item = await self._fetch_q.get()
            try:
                assert item.job.url is not None  # validated: upserts carry a url
                known = await self.unchanged.lookup(item.job.image_id)
                if known is None:
                    result = await self.fetcher.fetch(item.job.url)
                else:
                    result = await self.fetcher.fetch(
                        item.job.url,
                        etag=known.etag or None,
                        last_modified=known.last_modified or None,
                    )
                not_modified = bool(getattr(result, "not_modified", False))
                if not_modified and known is None:
                    raise PermanentError("HTTP 304 to an unconditional request", Reason.HTTP_4XX)
                item.content_hash = "" if not_modified else content_hash(result.data)
                item.etag = getattr(result, "etag", None) or ""
                item.last_modified = getattr(result, "last_modified", None) or ""
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
                result = await self.decoder.decode(item.data)
                if result.recovered and not self.settings.index_recovered:
                    raise PermanentError(
                        "truncated image (recoverable; policy is dead_letter)",
                        Reason.TRUNCATED,
                    )
                item.pixels = result.pixels
                item.recovered = result.recovered
                item.data = b""  # the compressed bytes are not needed past decode
            except Exception as exc:
                await self._fail(item.delivery, item.job, exc)
                continue
            await self._embed_q.put(item)

    async def _embed_stage(self) -> None:
        s = self.settings
        while True:
            batch = await next_batch(self._embed_q, s.max_batch, s.max_wait_s)
            pixels = np.stack([item.pixels for item in batch])  # type: ignore[misc]
            try:
                vectors = await asyncio.to_thread(self.embedder.embed, pixels)
            except Exception as exc:
                # The model failed on the batch: retry each job alone, never fail them all
                # with one reason they may not share.
                self.log.error("embed failed", error=str(exc), batch=len(batch))
                for item in batch:
                    await self._fail(item.delivery, item.job, exc)
                continue
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
                    )
                )
                if vector is None:
                    self.stats.deleted += 1
                else:
                    self.stats.indexed += 1
                    self.stats.recovered += int(item.recovered)
                    self.stats.unchanged += int(item.reused_vector is not None)
                self._unflushed.append(item.delivery)
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
                keys = await asyncio.to_thread(self.writer.flush)
            except Exception as exc:
                # Nothing is acked; the buffer stays and the next flush tries again.
                self.log.error("segment flush failed; will retry", error=str(exc))
                return
            done, self._unflushed = self._unflushed, []
            self._oldest_unflushed_s = None
        await self.broker.ack(done)
        for delivery in done:
            self._in_flight.pop(delivery.delivery_id, None)
        self.progress.advance(len(done))
        self.log.debug("flushed", segments=len(keys), jobs=len(done))
        if self.on_flushed:
            self.on_flushed(len(done))

    async def _fail(self, delivery: Delivery, job: Job | None, exc: BaseException) -> None:
        s = self.settings
        context = job.log_context() if job else {"delivery_id": delivery.delivery_id}
        try:
            if job is None:
                reason, _, message = classify(exc)
                await self.broker.dead_letter(delivery, reason, message, 1, None)
                self.stats.dead_lettered[reason] += 1
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
                    await self.broker.retry(delivery, job.next_attempt(), outcome.delay_s)
                    self.stats.retried += 1
                    self.log.info(
                        "retry scheduled",
                        reason=outcome.reason,
                        delay_s=round(outcome.delay_s, 2),
                        attempt=job.attempt + 1,
                        **context,
                    )
                else:
                    await self.broker.dead_letter(
                        delivery, outcome.reason, outcome.error, job.attempt + 1, job
                    )
                    self.stats.dead_lettered[outcome.reason] += 1
                    self.log.warning(
                        "dead-lettered",
                        reason=outcome.reason,
                        error=outcome.error,
                        **context,
                    )
        except ImgfleetError as broker_exc:
            # The outcome is not durable, so the job stays unacked and will be redelivered.
            self.log.error("could not settle failed job", error=str(broker_exc), **context)
            return
        self._in_flight.pop(delivery.delivery_id, None)
        self.progress.advance(1)
