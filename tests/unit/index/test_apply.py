"""Live apply: upserts, deletes, reorder, each segment once, crashes, compaction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.local import LocalStorage
from index.apply import Applier
from index.manifest import load_manifest
from index.publish import build_generation
from index.runs import RunInfo, write_run
from index.search import Searcher
from index.segments import list_segments
from tests.unit.index.conftest import DIM, RecordFactory, write_records


def applier(storage: LocalStorage, **kwargs: object) -> Applier:
    kwargs.setdefault("grace_s", 0.0)
    return Applier(storage, **kwargs)  # type: ignore[arg-type]


def ids_of(*items: str) -> set[int]:
    return {image_id_for(item, "0") for item in items}


def live_ids(storage: LocalStorage) -> set[int]:
    return {int(i) for i in Searcher(storage).image_ids()}


def top_item(storage: LocalStorage, vector: np.ndarray) -> str:
    (hits,) = Searcher(storage).search(vector[None, :].astype(np.float32), k=1)
    return hits[0].item_id


@pytest.fixture
def live(storage: LocalStorage, make_record: RecordFactory) -> LocalStorage:
    write_records(storage, 2, *[make_record(f"base-{i}", seed=i) for i in range(20)])
    build_generation(storage, 2, grace_s=0.0)
    return storage


def test_upsert_delete_and_new_item(live: LocalStorage, make_record: RecordFactory) -> None:
    searcher = Searcher(live)
    before = searcher.count()
    changed = make_record("base-3", version=2, seed=333)
    write_records(
        live,
        2,
        changed,
        make_record("base-4", version=2, vector=None),
        make_record("new-1", seed=77),
    )
    report = applier(live).apply_once()
    assert (report.upserts, report.deletes, report.stale) == (2, 1, 0)

    assert searcher.count() == before  # still the old revision until it reloads
    assert searcher.reload_if_changed() is True
    assert searcher.count() == before  # -1 deleted, +1 new
    assert live_ids(live) == (ids_of(*[f"base-{i}" for i in range(20)], "new-1") - ids_of("base-4"))
    stored = searcher.vector_of(image_id_for("base-3", "0"))
    assert stored is not None
    expected = changed.vector.astype(np.float32)
    np.testing.assert_allclose(stored, expected / np.linalg.norm(expected), atol=1e-6)
    assert top_item(live, changed.vector) == "base-3"


def test_reorder_older_version_after_newer_loses(
    live: LocalStorage, make_record: RecordFactory
) -> None:
    newer = make_record("base-1", version=5, seed=500)
    write_records(live, 2, newer)
    applier(live).apply_once()
    write_records(live, 2, make_record("base-1", version=4, seed=400))  # late redelivery
    report = applier(live).apply_once()
    assert report.stale == 1 and report.upserts == 0
    stored = Searcher(live).vector_of(image_id_for("base-1", "0"))
    assert stored is not None
    expected = newer.vector.astype(np.float32)
    np.testing.assert_allclose(stored, expected / np.linalg.norm(expected), atol=1e-6)


def test_delete_then_older_upsert_stays_deleted(
    live: LocalStorage, make_record: RecordFactory
) -> None:
    write_records(live, 2, make_record("base-2", version=3, vector=None))
    applier(live).apply_once()
    write_records(live, 2, make_record("base-2", version=2, seed=9))
    applier(live).apply_once()
    assert image_id_for("base-2", "0") not in live_ids(live)
    # A newer upsert does bring it back.
    write_records(live, 2, make_record("base-2", version=4, seed=10))
    applier(live).apply_once()
    assert image_id_for("base-2", "0") in live_ids(live)


def test_both_orders_in_one_cycle_end_the_same(tmp_path: Path, make_record: RecordFactory) -> None:
    finals = []
    for name, order in (("a", [1, 3, 2]), ("b", [3, 2, 1])):
        storage = LocalStorage(tmp_path / name)
        write_records(storage, 1, make_record("keep", seed=1))
        build_generation(storage, 1, grace_s=0.0)
        for version in order:
            write_records(storage, 1, make_record("x", version=version, seed=version))
        applier(storage).apply_once()
        finals.append(Searcher(storage).vector_of(image_id_for("x", "0")))
    assert finals[0] is not None and finals[1] is not None
    np.testing.assert_array_equal(finals[0], finals[1])


def test_each_segment_applied_once(live: LocalStorage, make_record: RecordFactory) -> None:
    keys = write_records(live, 2, *[make_record(f"cms-{i}", seed=100 + i) for i in range(6)])
    first = applier(live).apply_once()
    assert first.segments == len(keys) and first.upserts == 6
    second = applier(live).apply_once()
    assert second.segments == 0 and second.upserts == 0
    manifest = load_manifest(live)
    assert manifest is not None
    gen = manifest.current()
    assert gen.pending(list_segments(live)) == []
    assert gen.segments_applied_count == len(list_segments(live))


def test_replayed_segment_bytes_change_nothing(
    live: LocalStorage, make_record: RecordFactory
) -> None:
    keys = write_records(live, 2, make_record("base-5", version=7, seed=55))
    applier(live).apply_once()
    before = Searcher(live).vector_of(image_id_for("base-5", "0"))
    for key in keys:  # at-least-once: the same bytes again under a later key
        live.put(key.replace("-w1-", "-w9-").replace("/0", "/9", 1), live.get(key))
    report = applier(live).apply_once()
    assert report.segments == len(keys)
    assert Searcher(live).vector_of(image_id_for("base-5", "0")) == pytest.approx(before)
    assert len(live_ids(live)) == 20


class CrashingStorage(LocalStorage):
    """Real storage that raises once when a key containing ``marker`` is written."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.marker: str | None = None
        self.crashes = 0

    def put(self, key: str, data: bytes) -> None:
        if self.marker is not None and self.marker in key:
            self.marker = None
            self.crashes += 1
            raise OSError(f"injected crash writing {key}")
        super().put(key, data)


@pytest.mark.parametrize("marker", [".faiss", ".delta.npz", "manifest.json"])
def test_crash_mid_apply_then_rerun(
    tmp_path: Path, make_record: RecordFactory, marker: str
) -> None:
    storage = CrashingStorage(tmp_path / "store")
    write_records(storage, 2, *[make_record(f"base-{i}", seed=i) for i in range(20)])
    build_generation(storage, 2, grace_s=0.0)
    serving = Searcher(storage)
    manifest_before = load_manifest(storage)

    write_records(
        storage,
        2,
        make_record("base-0", version=2, vector=None),
        *[make_record(f"cms-{i}", seed=50 + i) for i in range(8)],
    )
    storage.marker = marker
    worker = applier(storage)
    with pytest.raises(OSError, match="injected"):
        worker.apply_once()
    assert storage.crashes == 1
    assert load_manifest(storage) == manifest_before  # nothing published
    assert serving.reload_if_changed() is False
    assert serving.count() == 20

    report = worker.apply_once()  # the same process retries (its cache was dropped) ...
    assert (report.upserts, report.deletes) == (8, 1)
    assert applier(storage).apply_once().segments == 0  # ... and nothing is applied twice
    assert serving.reload_if_changed() is True
    assert serving.count() == 27
    assert live_ids(storage) == ids_of(
        *[f"base-{i}" for i in range(1, 20)], *[f"cms-{i}" for i in range(8)]
    )


def test_compaction_merges_delta_into_base(live: LocalStorage, make_record: RecordFactory) -> None:
    worker = applier(live, compact_min_rows=4, compact_delta_fraction=0.2, retrain_fraction=100)
    write_records(live, 2, *[make_record(f"cms-{i}", seed=200 + i) for i in range(12)])
    report = worker.apply_once()
    assert sorted(report.compacted) == [0, 1]
    manifest = load_manifest(live)
    assert manifest is not None
    for shard in manifest.current().shards:
        assert shard.delta_key is None and shard.delta_rows == 0
        assert shard.base_rows == shard.vectors
    assert len(live_ids(live)) == 32
    target = make_record("cms-5", seed=205)
    assert top_item(live, target.vector) == "cms-5"


def test_retrain_when_churn_piles_up(live: LocalStorage, make_record: RecordFactory) -> None:
    worker = applier(live, compact_min_rows=1, retrain_fraction=0.5)
    write_records(live, 2, *[make_record(f"base-{i}", version=2, seed=900 + i) for i in range(20)])
    report = worker.apply_once()
    assert sorted(report.retrained) == [0, 1]
    manifest = load_manifest(live)
    assert manifest is not None
    assert all(s.changed_since_train == 0 and s.revision == 1 for s in manifest.current().shards)
    target = make_record("base-7", version=2, seed=907)
    assert top_item(live, target.vector) == "base-7"


def test_other_nightly_run_and_other_model_are_not_applied_live(
    live: LocalStorage, make_record: RecordFactory
) -> None:
    write_run(live, RunInfo("night-2", "catalogue.jsonl", 1, 0.0))
    write_records(
        live,
        2,
        make_record("nightly", seed=1, run_id="night-2"),
        make_record("other-model", seed=2, model_id="another-model"),
        make_record("cms", seed=3, run_id="adhoc"),
    )
    report = applier(live).apply_once()
    assert (report.other_run, report.other_model, report.upserts) == (1, 1, 1)
    ids = live_ids(live)
    assert image_id_for("cms", "0") in ids
    assert not ids & ids_of("nightly", "other-model")


def test_applied_segment_record_stays_small(live: LocalStorage, make_record: RecordFactory) -> None:
    worker = applier(live)
    for round_ in range(15):
        write_records(live, 2, *[make_record(f"r{round_}-{i}", seed=i) for i in range(4)])
        worker.apply_once()
    manifest = load_manifest(live)
    assert manifest is not None
    gen = manifest.current()
    # With no grace, the watermark passes every applied key: nothing is listed by name.
    assert gen.applied_after == []
    assert gen.segments_applied_count == len(list_segments(live))
    assert len(live_ids(live)) == 20 + 60


def test_dim_of_queries_unchanged_after_apply(
    live: LocalStorage, make_record: RecordFactory
) -> None:
    write_records(live, 2, make_record("cms", seed=1))
    applier(live).apply_once()
    with pytest.raises(ValueError, match="queries must be"):
        Searcher(live).search(np.ones((1, DIM + 2), np.float32))


def test_live_apply_on_an_ivf_shard(storage: LocalStorage) -> None:
    from index.params import IndexPolicy
    from index.segments import VectorRecord
    from tests.unit.index.conftest import MODEL_ID, clustered_vectors

    vectors = clustered_vectors(3_000, DIM, n_clusters=30, seed=4)
    records = [VectorRecord(i + 1, f"item-{i}", 1, "h", MODEL_ID, v) for i, v in enumerate(vectors)]
    write_records(storage, 1, *records)
    policy = IndexPolicy(flat_max_vectors=0, eval_queries=100)
    info = build_generation(storage, 1, policy=policy, grace_s=0.0)
    assert info.shards[0].params["kind"] == "ivf"

    moved = clustered_vectors(1, DIM, n_clusters=1, seed=99)[0]
    write_records(
        storage,
        1,
        VectorRecord(10, "item-9", 2, "h2", MODEL_ID, moved),
        VectorRecord(11, "item-10", 2, "h2", MODEL_ID, None),
    )
    report = applier(storage, policy=policy, retrain_fraction=100).apply_once()
    assert (report.upserts, report.deletes) == (1, 1)
    searcher = Searcher(storage)
    assert searcher.count() == 2_999
    searcher.set_nprobe(info.shards[0].params["nlist"])  # exhaustive: only codes matter
    (hits,) = searcher.search(moved[None, :], k=1, collapse_items=False)
    assert hits[0].image_id == 10
    assert 11 not in set(searcher.image_ids().tolist())
