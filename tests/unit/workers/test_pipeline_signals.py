"""The worker's operating signals: settled-job counters equal the real outcomes, the embed
stage's stall watch, and unrecoverable failures that hand jobs back instead of settling them.

Real local broker and segment storage; fetcher, decoder and embedder are in-memory fakes.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.brokers.local.broker import LocalBroker
from common.errors import PermanentError, Reason, TransientError, UnrecoverableError
from common.observability.health import Health
from common.observability.metrics import Metrics
from common.schema import Job, Lane, Op
from common.storage.local import LocalStorage
from index.segments import SegmentWriter, list_segments, read_segment
from workers.decode.types import DecodeResult
from workers.fetch.types import FetchResult
from workers.pipeline import PipelineSettings, Worker

DIM = 8
SETTINGS = PipelineSettings(
    fetch_concurrency=4,
    decode_concurrency=2,
    max_batch=4,
    max_wait_s=0.01,
    segment_flush_interval_s=0.1,
    retry_base_s=0.01,
    retry_max_s=0.02,
)


class Fetcher:
    def __init__(self) -> None:
        self.flaky_left = 1

    async def fetch(self, url: str, **_: Any) -> FetchResult:
        if url.endswith("/gone.jpg"):
            raise PermanentError("HTTP 404", Reason.HTTP_404)
        if url.endswith("/flaky.jpg") and self.flaky_left:
            self.flaky_left -= 1
            raise TransientError("read timed out", Reason.TIMEOUT)
        return FetchResult(url.encode(), None, None, 0.0)


class Decoder:
    async def decode(self, data: bytes) -> DecodeResult:
        pixels, recovered = np.zeros((4, 4, 3), np.uint8), data.endswith(b"/trunc.jpg")
        return DecodeResult(pixels, "jpeg", 4, 4, recovered, decode_ms=0.0, path="pillow-draft")


class Embedder:
    model_id = "model-t"

    def __init__(self) -> None:
        self.gate: threading.Event | None = None

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(10)
        return np.full((len(batch), DIM), 0.5, np.float32)


def job(item: str, **kw: Any) -> Job:
    return Job(item_id=item, url=f"http://img.test/{item}.jpg", run_id="night-1", **kw)


def records(storage: LocalStorage) -> list[Any]:
    return [r for key in list_segments(storage) for r in read_segment(storage, key).records()]


def make_worker(
    tmp_path: Path,
    broker: Any,
    *,
    decoder: Any = None,
    embedder: Any = None,
    settings: PipelineSettings = SETTINGS,
    **kw: Any,
) -> tuple[Worker, Metrics, LocalStorage]:
    storage = LocalStorage(tmp_path / "store")
    metrics = Metrics()
    worker = Worker(
        broker,
        SegmentWriter(storage, 2, "t"),
        Fetcher(),
        decoder or Decoder(),
        embedder or Embedder(),
        settings,
        metrics=metrics,
        **kw,
    )
    return worker, metrics, storage


def test_counters_equal_the_outcomes_one_increment_per_settled_job(tmp_path: Path) -> None:
    jobs = [
        job("good-1"),
        job("good-2"),
        job("trunc"),
        job("gone"),
        job("flaky"),
        Job(item_id="removed", op=Op.DELETE, run_id="night-1"),
        job("cms", lane=Lane.LIVE),
    ]

    async def go() -> tuple[Worker, Metrics, LocalStorage, list[Any]]:
        broker = LocalBroker(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        await broker.publish(jobs)
        await broker.publish_raw([b"{not json"])
        worker, metrics, storage = make_worker(tmp_path, broker)
        await worker.run(until_idle=True)
        dead = await broker.dead_letters()
        await broker.close()
        return worker, metrics, storage, dead

    worker, metrics, storage, dead = asyncio.run(go())
    v = metrics.value
    # Every delivery is counted once, redelivered retries again; a bad message has no lane.
    assert v("imgfleet_jobs_consumed_total", lane="bulk") == 7  # 6 bulk jobs + the retry
    assert v("imgfleet_jobs_consumed_total", lane="live") == 1
    assert v("imgfleet_jobs_consumed_total", lane="unknown") == 1
    acked = {
        (lane, outcome): v("imgfleet_jobs_acked_total", lane=lane, outcome=outcome)
        for lane in ("bulk", "live")
        for outcome in ("indexed", "unchanged", "recovered", "deleted")
    }
    assert {k: n for k, n in acked.items() if n} == {
        ("bulk", "indexed"): 3,  # good-1, good-2, flaky (second attempt)
        ("bulk", "recovered"): 1,
        ("bulk", "deleted"): 1,
        ("live", "indexed"): 1,
    }
    # ...and they are what the segments and the DLQ really hold.
    written = records(storage)
    assert sum(acked.values()) == len(written) == 6
    assert sum(r.is_tombstone for r in written) == acked[("bulk", "deleted")]
    assert v("imgfleet_jobs_retried_total", reason="timeout") == 1
    dead_by_reason = Counter(letter.reason for letter in dead)
    assert dead_by_reason == {"http_404": 1, "bad_message": 1}
    for reason, n in dead_by_reason.items():
        assert v("imgfleet_jobs_dead_lettered_total", reason=reason) == n
    assert v("imgfleet_in_flight_jobs") == 0
    # Stage timings and batch shapes.
    assert v("imgfleet_stage_seconds_count", stage="fetch") == 7  # 6 upserts, one twice
    assert v("imgfleet_stage_seconds_count", stage="decode") == 5
    assert v("imgfleet_decode_total", format="jpeg", path="cpu") == 4
    assert v("imgfleet_decode_total", format="jpeg", path="recovered") == 1
    assert v("imgfleet_batch_size_sum") == 5
    assert v("imgfleet_batch_size_count") == v("imgfleet_stage_seconds_count", stage="embed")
    assert v("imgfleet_stage_seconds_count", stage="segment_flush") >= 1
    assert v("imgfleet_stage_seconds_count", stage="ack") >= 1
    assert worker.stats.stopped_by == "idle"


def test_a_hung_embed_fails_liveness_until_the_batch_completes(tmp_path: Path) -> None:
    embedder = Embedder()
    embedder.gate = threading.Event()
    health = Health(stall_after_s=0.3)
    verdicts: list[bool] = []

    async def go() -> None:
        broker = LocalBroker(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        await broker.publish([job("slow")])
        worker, _, _ = make_worker(tmp_path, broker, embedder=embedder, health=health)
        run = asyncio.create_task(worker.run(until_idle=True))
        while health.watch("embed").busy_for_s() <= 0.5:  # noqa: ASYNC110 - polls a clock
            await asyncio.sleep(0.05)
        verdicts.append(health.liveness()[0])
        embedder.gate.set()  # type: ignore[union-attr]
        await run
        verdicts.append(health.liveness()[0])
        await broker.close()

    asyncio.run(go())
    assert verdicts == [False, True]
    assert health.watch("embed").completed == 1


class BrokenDecoder:
    async def decode(self, data: bytes) -> DecodeResult:
        raise UnrecoverableError("the decode pool died 20 times in a row", "decode_pool")


def test_an_unrecoverable_decoder_hands_the_jobs_back_unsettled(tmp_path: Path) -> None:
    async def go() -> tuple[int, list[Any], Metrics, Worker]:
        broker = LocalBroker(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        await broker.publish([job(f"i{n}") for n in range(5)])
        worker, metrics, _ = make_worker(tmp_path, broker, decoder=BrokenDecoder())
        with pytest.raises(UnrecoverableError) as failure:
            await worker.run()
        assert failure.value.component == "decode_pool"
        pending, dead = await broker.pending(), await broker.dead_letters()
        await broker.close()
        return pending, dead, metrics, worker

    pending, dead, metrics, worker = asyncio.run(go())
    assert pending == 5 and dead == []  # back on the queue, none dead-lettered or retried
    assert sum(metrics.value("imgfleet_jobs_retried_total", reason=r.value) for r in Reason) == 0
    assert metrics.value("imgfleet_in_flight_jobs") == 0
    assert worker.stats.stopped_by == "error"


class FailingConsume(LocalBroker):
    opened = 0

    def consume(self) -> Any:
        async def stream() -> Any:
            self.opened += 1
            raise TransientError("kafka consumer stopped: poll thread died", Reason.BROKER)
            yield  # noqa: V201 (an async generator)

        return stream()


def test_a_consume_stream_failing_past_the_give_up_stops_the_worker(tmp_path: Path) -> None:
    async def go() -> int:
        broker = FailingConsume(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        settings = replace(SETTINGS, consume_give_up_s=1.2)
        worker, _, _ = make_worker(tmp_path, broker, settings=settings)
        with pytest.raises(UnrecoverableError, match="poll thread died") as failure:
            await asyncio.wait_for(worker.run(), 30)
        assert failure.value.component == "broker"
        await broker.close()
        return broker.opened

    assert asyncio.run(go()) >= 2  # opened again before giving up (0.5 s, then 1 s apart)


class ConsumeOnceFailing(LocalBroker):
    """The first stream fails (a cut while consumers were registered); the next works."""

    opened = 0

    def consume(self) -> Any:
        self.opened += 1
        if self.opened == 1:

            async def failing() -> Any:
                raise ConnectionError("Server connection unexpectedly closed")
                yield  # noqa: V201 (an async generator)

            return failing()
        return super().consume()


def test_a_consume_stream_that_fails_once_is_opened_again(tmp_path: Path) -> None:
    async def go() -> tuple[int, int]:
        broker = ConsumeOnceFailing(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        await broker.publish([job("a"), job("b")])
        worker, metrics, _ = make_worker(tmp_path, broker)
        await asyncio.wait_for(worker.run(until_idle=True), 60)
        await broker.close()
        return broker.opened, int(
            metrics.value("imgfleet_jobs_acked_total", lane="bulk", outcome="indexed")
        )

    assert asyncio.run(go()) == (2, 2)
