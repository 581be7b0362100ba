"""Run accounting and finalisation inputs; KnownImages lookups for skipping unchanged images."""

from __future__ import annotations

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.local import LocalStorage
from index.apply import Applier
from index.known import KnownImages
from index.npz import pack_arrays, unpack_arrays
from index.publish import build_generation
from index.runs import (
    RUN_CLOCK_SKEW_S,
    RunInfo,
    RunNotFoundError,
    account_run,
    list_runs,
    read_finalization,
    read_run,
    write_finalization,
    write_run,
)
from index.search import Searcher
from index.segments import read_segment, segment_time_ns
from tests.unit.index.conftest import RecordFactory, write_records


def test_run_file_round_trip_and_validation(storage: LocalStorage) -> None:
    run = RunInfo("night-7", "catalogue.jsonl", 12, 1000.0)
    write_run(storage, run)
    assert read_run(storage, "night-7") == run
    assert list_runs(storage) == [run]
    with pytest.raises(RunNotFoundError):
        read_run(storage, "nope")
    with pytest.raises(ValueError, match="run id"):
        RunInfo("bad/id", "x", 1, 0.0)
    storage.put("runs/broken.json", b"{")
    with pytest.raises(RunNotFoundError, match="not a valid run"):
        read_run(storage, "broken")


def test_accounting_counts_records_and_dead_letters(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    run = RunInfo("night-1", "cat", 6, 0.0)
    write_run(storage, run)
    write_records(storage, 2, *[make_record(f"i{i}", run_id="night-1", seed=i) for i in range(3)])
    # A redelivered job writes its record twice: still one job.
    write_records(storage, 2, make_record("i0", run_id="night-1", seed=0))
    write_records(storage, 2, make_record("gone", run_id="night-1", vector=None))
    write_records(storage, 2, make_record("cms", run_id="adhoc"))

    partial = account_run(storage, run)
    assert (partial.indexed_jobs, partial.missing_jobs, partial.complete) == (4, 2, False)
    assert (partial.missing_jobs, partial.expected_jobs) == (2, 6)  # "2 of 6 jobs" missing

    # i1 was dead-lettered once and indexed after a requeue: it counts once.
    dead = [image_id_for("dead", "0"), image_id_for("i1", "0")]
    done = account_run(storage, run, dead_lettered_jobs=1, dead_lettered_image_ids=dead)
    assert (done.dead_lettered_jobs, done.accounted_jobs, done.complete) == (2, 6, True)
    record = write_finalization(storage, done, forced=False, generation=3)
    assert read_finalization(storage, "night-1") == record
    assert read_finalization(storage, "night-2") is None


def test_run_build_keeps_run_and_cms_records_only(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    (old_key,) = write_records(storage, 1, make_record("old-only", seed=1))
    build_generation(storage, 1, grace_s=0.0)
    # The run starts just after the old segment (the run file allows for clock skew).
    started_at_s = segment_time_ns(old_key) / 1e9 + RUN_CLOCK_SKEW_S + 1e-3
    write_run(storage, RunInfo("night-1", "cat", 2, started_at_s))
    write_run(storage, RunInfo("night-0", "cat", 1, 0.0))
    write_records(
        storage,
        1,
        make_record("a", run_id="night-1", seed=2),
        make_record("b", run_id="night-1", seed=3),
        make_record("stale-run", run_id="night-0", seed=4),
        make_record("cms", seed=5),
    )
    info = build_generation(storage, 1, run_id="night-1", grace_s=0.0)
    ids = {int(i) for i in Searcher(storage).image_ids()}
    assert ids == {image_id_for(n, "0") for n in ("a", "b", "cms")}
    assert info.run_id == "night-1"
    assert info.is_applied(old_key)  # older than the run: never applied to it later


def test_old_segments_without_new_columns_still_read(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    (key,) = write_records(storage, 1, make_record("a", seed=1))
    arrays = unpack_arrays(storage.get(key))
    for name in ("etag", "last_modified", "run_id"):
        del arrays[name]
    arrays["format_version"] = np.array(1, dtype=np.int64)
    storage.put(key, pack_arrays(arrays))
    segment = read_segment(storage, key)
    (record,) = segment.records()
    assert (record.etag, record.last_modified, record.run_id) == ("", "", "")
    assert build_generation(storage, 1).total_vectors == 1


def test_known_images_answers_from_generation_and_live_apply(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    known = KnownImages(storage, check_interval_s=0.0)
    assert known.lookup(image_id_for("a", "0")) is None  # no index yet

    a = make_record("a", seed=1, version=3)
    write_records(storage, 2, a, make_record("b", seed=2), make_record("c", seed=3))
    build_generation(storage, 2, grace_s=0.0)
    found = known.lookup(a.image_id)
    assert found is not None
    assert (found.item_id, found.version, found.content_hash) == ("a", 3, a.content_hash)
    assert found.etag == a.etag and found.last_modified == a.last_modified
    assert found.model_id == a.model_id
    assert found.vector.dtype == np.float16
    np.testing.assert_array_equal(found.vector, a.vector)  # exact, not quantised

    a4 = make_record("a", seed=40, version=4)
    write_records(storage, 2, a4, make_record("b", version=2, vector=None), make_record("new"))
    Applier(storage, grace_s=0.0).apply_once()
    again = known.lookup(a.image_id)
    assert again is not None and again.version == 4
    np.testing.assert_array_equal(again.vector, a4.vector)
    assert known.lookup(image_id_for("b", "0")) is None  # deleted
    assert known.lookup(image_id_for("new", "0")) is not None
    assert known.lookup(image_id_for("never", "0")) is None


def test_known_images_rereads_manifest_only_when_due(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write_records(storage, 1, make_record("a", seed=1))
    build_generation(storage, 1, grace_s=0.0)
    known = KnownImages(storage, check_interval_s=3600.0)
    assert known.lookup(image_id_for("a", "0")) is not None
    write_records(storage, 1, make_record("z", seed=2))
    build_generation(storage, 1, grace_s=0.0)
    assert known.lookup(image_id_for("z", "0")) is None  # not due yet
    assert known.refresh(force=True) is True
    assert known.lookup(image_id_for("z", "0")) is not None
