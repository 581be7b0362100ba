"""The producer's parts: de-duplication set, image snapshot and its diff, deletes and their
guard, rate limiter, checkpoint, and the run file's compatibility."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson
import pytest

from common.identity import image_id_for, job_id_for
from common.observability.metrics import ProducerMetrics
from common.schema import Job, Lane, Op
from common.storage.local import LocalStorage
from index.runs import (
    RunInfo,
    RunStillPublishingError,
    ensure_published,
    list_runs,
    read_run,
    write_run,
)
from producers.catalogue.reader import CatalogueItem
from producers.nightly.batches import ConfirmedBatches
from producers.nightly.checkpoint import (
    Checkpoint,
    checkpoint_key,
    load_checkpoint,
    save_checkpoint,
)
from producers.nightly.deletes import MassDeleteError, check_delete_guard, delete_jobs
from producers.nightly.image_set import ImageIdSet
from producers.nightly.rate_limit import TokenBucket
from producers.nightly.snapshot import (
    ImageSnapshot,
    SnapshotBuilder,
    load_snapshot,
    save_snapshot,
    snapshot_key,
)
from producers.nightly.upserts import PublishCounts, UpsertPhase


class _Confirming:
    """A broker that confirms every publish at once and keeps its jobs."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    async def publish(self, jobs: list[Job], ledger: str | None = None) -> None:
        self.jobs += jobs


def _upsert_jobs(items: list[CatalogueItem], run_id: str) -> list[Job]:
    """The jobs the nightly run's upsert phase publishes for ``items``, in order."""
    broker = _Confirming()

    async def scenario() -> None:
        metrics = ProducerMetrics()
        batches = ConfirmedBatches(
            broker,  # type: ignore[arg-type]
            ledger=None,
            in_flight=1,
            limiter=TokenBucket(0),
            metrics=metrics,
        )
        phase = UpsertPhase(
            run_id=run_id,
            lane=Lane.BULK,
            batch_size=500,
            builder=SnapshotBuilder(),
            counts=PublishCounts(),
            batches=batches,
            metrics=metrics,
        )
        await phase.run(items)

    asyncio.run(scenario())
    return broker.jobs


def test_image_id_set_matches_a_python_set_and_keeps_first_positions() -> None:
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 2**63 - 1, 5_000, dtype=np.int64)
    ids = ImageIdSet()
    reference: dict[int, int] = {}
    for _ in range(60):
        batch = rng.choice(pool, size=int(rng.integers(1, 400)))
        fresh = ids.add(batch)
        expected = []
        for value in batch.tolist():
            is_new = value not in reference
            if is_new:
                reference[value] = len(reference)
            expected.append(is_new)
        assert fresh.tolist() == expected
    assert len(ids) == len(reference)
    assert ids.contains(np.array(list(reference), np.int64)).all()
    outside = np.setdiff1d(rng.integers(0, 2**63 - 1, 1000, dtype=np.int64), pool)
    assert not ids.contains(outside).any()
    sorted_ids, positions = ids.sorted_items()
    assert sorted_ids.tolist() == sorted(reference)
    assert positions.tolist() == [reference[v] for v in sorted_ids.tolist()]
    assert ids.nbytes == 12 * len(reference)


def test_image_id_set_stays_at_a_few_runs_for_many_batches() -> None:
    ids = ImageIdSet()
    for start in range(0, 200_000, 500):
        ids.add(np.arange(start, start + 500, dtype=np.int64))
    assert len(ids._runs) <= 2 * int(np.log2(200_000 / 500)) + 1
    assert len(ids) == 200_000 and ids.nbytes == 12 * 200_000


def _build(rows: list[tuple[str, int, int]]) -> ImageSnapshot:
    """Snapshot of items (item id, images, version) added one item per batch."""
    builder = SnapshotBuilder()
    for item_id, images, version in rows:
        builder.add(
            [item_id],
            [0] * images,
            [image_id_for(item_id, str(k)) for k in range(images)],
            list(range(images)),
            [version] * images,
            [_url(item_id, k, version) for k in range(images)],
        )
    return builder.finish()


def _url(item_id: str, key: int, version: int) -> str:
    return f"http://x/{item_id}/{key}/v{version}.jpg"


def test_snapshot_round_trip_and_diff(tmp_path: Path) -> None:
    before = _build([("a", 2, 5), ("b", 3, 1), ("c", 1, 7), ("b", 3, 9), ("ü-d", 1, 2)])
    assert len(before) == 7  # the repeated item "b" added nothing
    storage = LocalStorage(tmp_path)
    save_snapshot(storage, "night-1", before)
    assert snapshot_key("night-1") == "runs/night-1/images.npz"
    loaded = load_snapshot(storage, "night-1")
    assert loaded is not None
    assert loaded.image_ids.tolist() == sorted(loaded.image_ids.tolist())
    for index in range(len(loaded)):
        item, key = loaded.item_id(index), str(int(loaded.image_keys[index]))
        assert image_id_for(item, key) == int(loaded.image_ids[index])
    by_item = {loaded.item_id(i): int(loaded.versions[i]) for i in range(len(loaded))}
    assert by_item == {"a": 5, "b": 1, "c": 7, "ü-d": 2}  # first seen wins
    # Each image keeps its URL (what lets the next run keep the item of a rejected row).
    urls = loaded.urls_at(np.arange(len(loaded))[::-1])
    assert urls == [
        _url(loaded.item_id(i), int(loaded.image_keys[i]), int(loaded.versions[i]))
        for i in range(len(loaded))[::-1]
    ]
    # Saved without pickle: numpy refuses pickled arrays when loading it.
    with np.load(storage.local_path("runs/night-1/images.npz"), allow_pickle=False) as npz:
        assert {"image_ids", "item_blob", "item_offsets"} <= set(npz.files)

    after = _build([("a", 1, 6), ("c", 1, 7), ("e", 2, 1), ("ü-d", 1, 3)])
    gone = loaded.missing_from(after)
    got = {(loaded.item_id(i), int(loaded.image_keys[i])) for i in gone.tolist()}
    assert got == {("a", 1), ("b", 0), ("b", 1), ("b", 2)}
    assert load_snapshot(storage, "nope") is None
    assert len(ImageSnapshot.empty().missing_from(after)) == 0


def test_delete_jobs_carry_the_previous_version_and_stable_ids() -> None:
    previous = _build([("a", 2, 5), ("b", 1, 3)])
    gone = previous.missing_from(_build([("a", 1, 6)]))
    batches = list(delete_jobs(previous, gone, "night-2", batch_size=1))
    assert [end for end, _ in batches] == [1, 2]
    jobs = [job for _, batch in batches for job in batch]
    assert {(j.item_id, j.image_key, j.version, j.op) for j in jobs} == {
        ("a", "1", 5, Op.DELETE),
        ("b", "0", 3, Op.DELETE),
    }
    assert all(j.job_id == job_id_for("night-2", j.image_id, "delete") for j in jobs)
    # A resume continues after what the checkpoint says was confirmed.
    rest = list(delete_jobs(previous, gone, "night-2", start=1, batch_size=10))
    assert [j.job_id for _, b in rest for j in b] == [jobs[1].job_id]


def test_mass_delete_guard() -> None:
    check_delete_guard("r", 20, 100, 0.2, allow=False)  # at the limit is fine
    with pytest.raises(MassDeleteError, match="--allow-mass-delete"):
        check_delete_guard("r", 21, 100, 0.2, allow=False)
    check_delete_guard("r", 100, 100, 0.2, allow=True)


def test_jobs_carry_run_and_position_keys() -> None:
    item = CatalogueItem(1, "sku", ("u0", "u1"), 9)
    jobs = _upsert_jobs([item], "run-x")
    assert [(j.image_key, j.url, j.version, j.run_id) for j in jobs] == [
        ("0", "u0", 9, "run-x"),
        ("1", "u1", 9, "run-x"),
    ]
    assert isinstance(jobs[0], Job)


def test_job_ids_are_deterministic_per_run_image_and_op() -> None:
    item = CatalogueItem(1, "sku", ("http://x/0", "http://x/1"), 4)
    first, again = _upsert_jobs([item], "run-x"), _upsert_jobs([item], "run-x")
    assert [j.job_id for j in first] == [j.job_id for j in again]
    assert first[0].job_id == job_id_for("run-x", image_id_for("sku", "0"), "upsert")
    assert first[0].job_id != _upsert_jobs([item], "run-y")[0].job_id
    assert len({j.job_id for j in first}) == 2


def test_token_bucket_keeps_the_rate_and_lets_a_large_batch_through() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def scenario() -> None:
        bucket = TokenBucket(100.0, burst=100.0, clock=lambda: now[0], sleep=sleep)
        for _ in range(10):
            await bucket.acquire(50)  # 500 jobs at 100/s with a full 100 burst: 4 s
        assert now[0] == pytest.approx(4.0)
        await bucket.acquire(1000)  # bigger than the burst: sent whole, paid for after
        assert now[0] == pytest.approx(14.0)
        now[0] += 100.0  # idle: refills to the burst, no more
        await bucket.acquire(100)
        assert now[0] == pytest.approx(114.0)
        await bucket.acquire(1)
        assert now[0] == pytest.approx(114.01)
        unlimited = TokenBucket(0)
        assert await unlimited.acquire(10**9) == 0.0

    asyncio.run(scenario())
    assert all(s > 0 for s in slept)


def test_checkpoint_round_trip_under_the_run_prefix(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    cp = Checkpoint("night-3", rows_consumed=1200, jobs_confirmed=2400)
    cp = cp.advanced(ledger_position={"t.jobs.bulk:0": 17}, rejects_bytes=99)
    save_checkpoint(storage, cp)
    assert checkpoint_key("night-3") == "runs/night-3/checkpoint.json"
    assert load_checkpoint(storage, "night-3") == cp
    assert load_checkpoint(storage, "night-4") is None
    # A checkpoint from a later version with more keys still loads.
    raw = orjson.loads(storage.get(checkpoint_key("night-3")))
    storage.put(checkpoint_key("night-3"), orjson.dumps({**raw, "future": 1}))
    assert load_checkpoint(storage, "night-3") == cp
    # Keys below runs/<id>/ are not run files.
    write_run(storage, RunInfo("night-3", "c.jsonl", 0, 1.0, state="publishing"))
    assert [r.run_id for r in list_runs(storage)] == ["night-3"]


def test_run_files_old_and_new(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put(
        "runs/old.json",
        orjson.dumps({"run_id": "old", "source": "x", "expected_jobs": 3, "started_at_s": 1.0}),
    )
    old = read_run(storage, "old")
    assert old.state == "published" and old.catalogue == "" and old.finished_at_s is None
    ensure_published(old)
    new = RunInfo("new", "y", 0, 2.0, catalogue="shop", state="publishing", published_jobs=40)
    write_run(storage, new)
    assert read_run(storage, "new") == new
    with pytest.raises(RunStillPublishingError, match="still publishing"):
        ensure_published(read_run(storage, "new"))
    with pytest.raises(ValueError):
        RunInfo("bad", "y", 0, 0.0, state="half-done")
