"""Unchanged images skip decode and embedding and reuse the stored vector.

Real local broker and segment storage; the fetcher, decoder, embedder and the index
lookup are in-memory fakes (unit test).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.brokers.local.broker import LocalBroker
from common.identity import content_hash
from common.schema import Job
from common.storage.local import LocalStorage
from index.segments import SegmentWriter, list_segments, read_segment
from workers.decode.types import DecodeResult
from workers.fetch.types import FetchResult
from workers.fetch.unchanged import UnchangedImages
from workers.pipeline import PipelineSettings, Worker

DIM = 8
NEW_BYTES = b"new image bytes"
OLD_BYTES = b"old image bytes"


@dataclass(frozen=True)
class Known:
    content_hash: str
    etag: str
    last_modified: str
    model_id: str
    vector: np.ndarray


class FakeFetcher:
    def __init__(self, bodies: dict[str, bytes], etags: dict[str, str]) -> None:
        self.bodies, self.etags = bodies, etags
        self.calls: list[tuple[str, str | None, str | None]] = []

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        self.calls.append((url, etag, last_modified))
        current = self.etags.get(url)
        if etag is not None and etag == current:
            return FetchResult(b"", current, None, 1.0, not_modified=True)
        return FetchResult(self.bodies[url], current, "Sat, 21 Nov 2026 00:00:00 GMT", 1.0)


class CountingDecoder:
    def __init__(self) -> None:
        self.calls = 0

    async def decode(self, data: bytes) -> DecodeResult:
        self.calls += 1
        pixels = np.zeros((224, 224, 3), np.uint8)
        return DecodeResult(pixels, "png", 224, 224, recovered=False, decode_ms=0.0, path="vips")


class CountingEmbedder:
    model_id = "model-a"

    def __init__(self) -> None:
        self.images = 0

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.images += len(batch)
        return np.full((len(batch), DIM), 0.5, np.float32)


class Lookup:
    def __init__(self, table: dict[int, Known], fail: bool = False) -> None:
        self.table, self.fail = table, fail

    def lookup(self, image_id: int) -> Known | None:
        if self.fail:
            raise OSError("index unreadable")
        return self.table.get(image_id)


def stored_vector() -> np.ndarray:
    return np.arange(DIM, dtype=np.float16) / 10


def run(tmp_path: Path, jobs: list[Job], fetcher: FakeFetcher, known: Any) -> tuple[Any, ...]:
    storage = LocalStorage(tmp_path / "store")
    decoder, embedder = CountingDecoder(), CountingEmbedder()

    async def go() -> Any:
        broker = LocalBroker(tmp_path / "q.sqlite3", poll_interval_s=0.02)
        await broker.publish(jobs)
        worker = Worker(
            broker,
            SegmentWriter(storage, 2, "t"),
            fetcher,
            decoder,
            embedder,
            PipelineSettings(max_wait_s=0.01, segment_flush_interval_s=0.1),
            known=known,
        )
        stats = await worker.run(until_idle=True)
        await broker.close()
        return stats

    stats = asyncio.run(go())
    records = {
        r.image_id: r
        for key in list_segments(storage)
        for r in read_segment(storage, key).records()
    }
    return stats, records, decoder, embedder


def jobs_and_urls() -> tuple[list[Job], dict[str, Job]]:
    jobs = [
        Job(item_id=name, url=f"http://cdn.example/{name}.jpg", run_id="night-2", version=2)
        for name in ("same-etag", "same-bytes", "changed", "other-model", "new")
    ]
    return jobs, {j.item_id: j for j in jobs}


def test_unchanged_images_reuse_the_stored_vector(tmp_path: Path) -> None:
    jobs, by_name = jobs_and_urls()
    bodies = {j.url: NEW_BYTES for j in jobs}
    bodies[by_name["same-bytes"].url] = OLD_BYTES  # type: ignore[index]
    etags = {by_name["same-etag"].url: '"v1"'}  # type: ignore[dict-item]
    fetcher = FakeFetcher(bodies, etags)  # type: ignore[arg-type]
    old_hash = content_hash(OLD_BYTES)

    def known(model_id: str = "model-a", etag: str = "") -> Known:
        return Known(old_hash, etag, "", model_id, stored_vector())

    table = {
        by_name["same-etag"].image_id: known(etag='"v1"'),
        by_name["same-bytes"].image_id: known(),
        by_name["changed"].image_id: known(),
        by_name["other-model"].image_id: known(model_id="model-b"),
    }
    stats, records, decoder, embedder = run(tmp_path, jobs, fetcher, Lookup(table))

    assert len(records) == 5  # the run's segments hold every image of the run
    assert stats.unchanged == 2 and stats.not_modified == 1 and stats.indexed == 5
    assert decoder.calls == 3 and embedder.images == 3  # changed, other-model, new
    for name in ("same-etag", "same-bytes"):
        record = records[by_name[name].image_id]
        assert np.array_equal(record.vector, stored_vector())
        assert record.content_hash == old_hash
        assert (record.run_id, record.version, record.model_id) == ("night-2", 2, "model-a")
    assert records[by_name["same-etag"].image_id].etag == '"v1"'
    for name in ("changed", "other-model", "new"):
        record = records[by_name[name].image_id]
        assert np.allclose(record.vector.astype(np.float32), 0.5)
        assert record.content_hash == content_hash(NEW_BYTES)
        assert record.last_modified == "Sat, 21 Nov 2026 00:00:00 GMT"
        assert record.run_id == "night-2"
    # Conditional headers only where the stored record can be reused by this model.
    sent = {url: etag for url, etag, _ in fetcher.calls}
    assert sent[by_name["same-etag"].url] == '"v1"'
    assert sent[by_name["other-model"].url] is None
    assert sent[by_name["new"].url] is None


def test_lookup_failure_means_full_processing(tmp_path: Path) -> None:
    jobs, _ = jobs_and_urls()
    fetcher = FakeFetcher({j.url: NEW_BYTES for j in jobs}, {})  # type: ignore[misc]
    stats, records, decoder, _ = run(tmp_path, jobs, fetcher, Lookup({}, fail=True))
    assert len(records) == 5 and stats.unchanged == 0 and decoder.calls == 5
    assert stats.dead_lettered == {}


def test_reuse_decision() -> None:
    record = Known("h1", '"e"', "lm", "m", stored_vector())
    assert (
        UnchangedImages.reuse(
            None, not_modified=False, content_hash="h1", etag=None, last_modified=None
        )
        is None
    )
    reuse = UnchangedImages.reuse(
        record, not_modified=True, content_hash="", etag=None, last_modified=None
    )
    assert reuse is not None and (reuse.content_hash, reuse.etag, reuse.last_modified) == (
        "h1",
        '"e"',
        "lm",
    )
    assert (
        UnchangedImages.reuse(
            record, not_modified=False, content_hash="h2", etag=None, last_modified=None
        )
        is None
    )
    assert (
        UnchangedImages.reuse(
            record, not_modified=False, content_hash="h1", etag='"f"', last_modified=None
        ).etag
        == '"f"'
    )  # type: ignore[union-attr]


@pytest.mark.parametrize("model_id", ["m", "other"])
def test_lookup_filters_by_model(model_id: str) -> None:
    record = Known("h1", "", "", model_id, stored_vector())
    checker = UnchangedImages(Lookup({1: record}), "m")
    found = asyncio.run(checker.lookup(1))
    assert (found is not None) == (model_id == "m")
    assert asyncio.run(checker.lookup(2)) is None
