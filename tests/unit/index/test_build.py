from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from common.identity import image_id_for
from common.storage.local import LocalStorage
from index.manifest import MANIFEST_KEY, load_manifest, shard_index_key, shard_items_key
from index.publish import build_generation
from index.records import IndexBuildError
from index.runs import RunInfo, write_run
from index.search import Searcher
from index.segments import SegmentWriter, VectorRecord, list_segments
from tests.unit.index.conftest import DIM, MODEL_ID, RecordFactory


def write(storage: LocalStorage, n_shards: int, *records: VectorRecord) -> list[str]:
    """Each call is one flush, so each call's records land in later segments."""
    writer = SegmentWriter(storage, n_shards=n_shards, writer_id="w1")
    for record in records:
        writer.add(record)
    return writer.flush()


def live_ids(storage: LocalStorage) -> set[int]:
    return {int(i) for i in Searcher(storage).image_ids()}


def test_upsert_newer_version_replaces(storage: LocalStorage, make_record: RecordFactory) -> None:
    write(storage, 2, make_record("a", version=1, seed=1))
    write(storage, 2, make_record("a", version=2, seed=2))
    build_generation(storage, 2)
    searcher = Searcher(storage)
    image_id = image_id_for("a", "0")
    stored = searcher.vector_of(image_id)
    assert stored is not None
    expected = make_record("a", version=2, seed=2).vector.astype(np.float32)
    np.testing.assert_allclose(stored, expected / np.linalg.norm(expected), atol=1e-6)
    assert searcher.count() == 1


def test_older_version_arriving_later_loses(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write(storage, 2, make_record("a", version=5, seed=5))
    write(storage, 2, make_record("a", version=4, seed=4))  # redelivered stale job
    build_generation(storage, 2)
    stored = Searcher(storage).vector_of(image_id_for("a", "0"))
    assert stored is not None
    newer = make_record("a", version=5, seed=5).vector.astype(np.float32)
    np.testing.assert_allclose(stored, newer / np.linalg.norm(newer), atol=1e-6)


def test_delete_then_older_upsert_stays_deleted(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write(storage, 2, make_record("keep", seed=9), make_record("a", version=1, seed=1))
    write(storage, 2, make_record("a", version=3, vector=None))
    write(storage, 2, make_record("a", version=2, seed=2))  # older than the delete
    build_generation(storage, 2)
    assert live_ids(storage) == {image_id_for("keep", "0")}


def test_tombstone_with_equal_version_deletes(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write(storage, 1, make_record("keep", seed=9), make_record("a", version=2))
    write(storage, 1, make_record("a", version=2, vector=None))
    build_generation(storage, 1)
    assert live_ids(storage) == {image_id_for("keep", "0")}


def test_newer_upsert_after_delete_restores(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write(storage, 1, make_record("a", version=1))
    write(storage, 1, make_record("a", version=2, vector=None))
    write(storage, 1, make_record("a", version=3))
    build_generation(storage, 1)
    assert live_ids(storage) == {image_id_for("a", "0")}


def test_replaying_a_segment_changes_nothing(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    records = [make_record(f"item-{i}", str(i % 2), seed=i) for i in range(30)]
    records.append(make_record("item-3", "1", version=9, vector=None))
    keys = write(storage, 3, *records)
    first = build_generation(storage, 3)

    # At-least-once delivery: the same segment bytes show up again under a later key.
    for key in keys:
        replayed = key.replace("-w1-", "-w9-").replace("/0", "/9", 1)
        assert replayed > key
        storage.put(replayed, storage.get(key))
    second = build_generation(storage, 3)

    assert second.generation == first.generation + 1
    assert second.segments_applied_count == 2 * first.segments_applied_count
    assert second.vector_counts == first.vector_counts
    for shard in range(3):
        for key_of in (shard_index_key, shard_items_key):
            assert storage.get(key_of(second.generation, shard)) == storage.get(
                key_of(first.generation, shard)
            )


def test_each_image_present_exactly_once(storage: LocalStorage, make_record: RecordFactory) -> None:
    ids = set()
    for round_ in range(3):  # every image written three times, across several segments
        batch = [make_record(f"item-{i}", "0", version=round_, seed=i) for i in range(40)]
        write(storage, 4, *batch)
        ids |= {r.image_id for r in batch}
    info = build_generation(storage, 4)
    got = Searcher(storage).image_ids()
    assert len(got) == len(set(got.tolist())) == 40
    assert set(got.tolist()) == ids
    assert info.total_vectors == 40


def test_empty_shards_are_written(storage: LocalStorage, make_record: RecordFactory) -> None:
    write(storage, 8, make_record("only"))
    info = build_generation(storage, 8)
    assert sum(1 for n in info.vector_counts if n == 0) == 7
    assert all(storage.exists(key) for key in info.shard_keys + info.item_keys)
    assert info.dim == DIM
    assert info.model_id == MODEL_ID
    searcher = Searcher(storage)
    assert searcher.count() == 1
    assert len(searcher.search(np.ones((1, DIM), np.float32), k=5)[0]) == 1


def test_no_vectors_and_no_dim_is_an_error(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    with pytest.raises(IndexBuildError, match="dim is unknown"):
        build_generation(storage, 2)
    write(storage, 2, make_record("a", vector=None))
    with pytest.raises(IndexBuildError, match="dim is unknown"):
        build_generation(storage, 2)
    assert not storage.exists(MANIFEST_KEY)


def test_everything_deleted_keeps_previous_dim(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write(storage, 2, make_record("a", version=1))
    build_generation(storage, 2)
    write(storage, 2, make_record("a", version=2, vector=None))
    info = build_generation(storage, 2)
    assert info.dim == DIM and info.total_vectors == 0
    assert Searcher(storage).count() == 0


def test_manifest_records_generation(storage: LocalStorage, make_record: RecordFactory) -> None:
    write(storage, 2, *[make_record(f"i{i}", seed=i) for i in range(10)])
    info = build_generation(storage, 2)
    manifest = load_manifest(storage)
    assert manifest is not None
    assert manifest.current() == info
    assert info.generation == 1
    assert info.segments_applied_count == len(list_segments(storage))
    assert all(info.is_applied(key) for key in list_segments(storage))
    assert info.pending(list_segments(storage)) == []
    assert info.index_params["metric"] == "inner_product"
    assert all(s.params["factory"] == "IDMap2,Flat" for s in info.shards)
    assert all(s.recall_at_10 == 1.0 for s in info.shards if s.vectors > 1)


class FailingShardStorage(LocalStorage):
    """Real storage that fails writing one shard file, as a crash mid-build would."""

    def __init__(self, root: Path, failing_key: str) -> None:
        super().__init__(root)
        self.failing_key = failing_key

    def put(self, key: str, data: bytes) -> None:
        if key == self.failing_key:
            raise OSError(f"injected failure writing {key}")
        super().put(key, data)


def test_failed_build_leaves_previous_generation_serving(
    tmp_path: Path, make_record: RecordFactory
) -> None:
    storage = FailingShardStorage(tmp_path / "store", failing_key=shard_index_key(2, 1))
    write(storage, 3, *[make_record(f"old-{i}", seed=i) for i in range(20)])
    build_generation(storage, 3)
    searcher = Searcher(storage)
    before = sorted(searcher.image_ids().tolist())

    write(storage, 3, *[make_record(f"new-{i}", seed=100 + i) for i in range(20)])
    with pytest.raises(OSError, match="injected"):
        build_generation(storage, 3)

    assert storage.exists(shard_index_key(2, 0))  # the build did get part way
    manifest = load_manifest(storage)
    assert manifest is not None and manifest.current_generation == 1
    assert searcher.reload_if_changed() is False
    assert sorted(Searcher(storage).image_ids().tolist()) == before

    storage.failing_key = ""  # the retry reuses generation 2 and overwrites its leftovers
    info = build_generation(storage, 3)
    assert info.generation == 2
    assert searcher.reload_if_changed() is True
    assert searcher.count() == 40


def test_segments_rebuild_with_another_shard_count(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    records = [make_record(f"i{i}", seed=i) for i in range(40)]
    write(storage, 4, *records)
    write(storage, 4, make_record("i3", version=2, vector=None))
    expected = {r.image_id for r in records} - {image_id_for("i3", "0")}
    for n_shards in (4, 2, 8, 1):
        info = build_generation(storage, n_shards)
        assert info.n_shards == n_shards and info.total_vectors == 39
        searcher = Searcher(storage)
        assert set(searcher.image_ids().tolist()) == expected
        target = records[7]
        (hits,) = searcher.search(target.vector[None, :].astype(np.float32), k=1)
        assert hits[0].item_id == "i7"


def test_mixed_models_are_refused(storage: LocalStorage, make_record: RecordFactory) -> None:
    other = make_record("b")
    write(
        storage,
        1,
        make_record("a"),
        VectorRecord(other.image_id, "b", 1, "h", "other-model", other.vector),
    )
    with pytest.raises(IndexBuildError, match="several models"):
        build_generation(storage, 1)


def test_a_runs_generation_holds_the_runs_model_alone(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    """After a model switch: night-2 re-embedded with the new model; an old-model record
    written after it (a worker not yet switched) and the image night-2 could not embed stay
    out of night-2's generation, so it holds one vector space."""
    write_run(storage, RunInfo("night-1", "cat", 3, 0.0))
    write(storage, 1, *[make_record(f"i{i}", seed=i, run_id="night-1") for i in range(3)])
    build_generation(storage, 1, run_id="night-1", grace_s=0.0)
    assert load_manifest(storage).current().model_id == MODEL_ID  # type: ignore[union-attr]
    write_run(storage, RunInfo("night-2", "cat", 3, 0.0))
    new = [
        make_record(f"i{i}", version=2, seed=10 + i, run_id="night-2", model_id="m-new")
        for i in range(2)
    ]  # i2 failed in night-2
    write(storage, 1, *new)
    write(storage, 1, make_record("cms-late", seed=7))  # the old model, after the switch
    with pytest.raises(IndexBuildError, match="several models"):
        build_generation(storage, 1)  # not a run's build: the mix is refused, not guessed
    info = build_generation(storage, 1, run_id="night-2", grace_s=0.0)
    assert info.model_id == "m-new"
    assert live_ids(storage) == {image_id_for(f"i{i}", "0") for i in range(2)}


def test_build_logs_each_shard(storage: LocalStorage, make_record: RecordFactory) -> None:
    write(storage, 3, *[make_record(f"i{i}", seed=i) for i in range(12)])
    with capture_logs() as logs:
        build_generation(storage, 3)
    shard_events = [e for e in logs if e["event"] == "shard_built"]
    assert sorted(e["shard"] for e in shard_events) == [0, 1, 2]
    assert sum(e["vectors"] for e in shard_events) == 12
    assert all("seconds" in e for e in shard_events)
