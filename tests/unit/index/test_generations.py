"""Generations: build N+1 while N serves, CMS changes during a rebuild, crash, rollback, prune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.local import LocalStorage
from index.apply import Applier
from index.evaluation import evaluate_generation
from index.generations import GenerationError, prune, rollback, status
from index.manifest import MANIFEST_KEY, load_manifest
from index.publish import build_generation
from index.runs import RunInfo, write_run
from index.search import Searcher
from index.segments import VectorRecord, list_segments
from tests.unit.index.conftest import RecordFactory, write_records


def live_ids(storage: LocalStorage, generation: int | None = None) -> set[int]:
    return {int(i) for i in Searcher(storage, generation=generation).image_ids()}


def published(storage: LocalStorage, n_shards: int, *records: VectorRecord, **build: Any) -> None:
    """``records`` written, then a generation built of everything written so far."""
    write_records(storage, n_shards, *records)
    build_generation(storage, n_shards, grace_s=0.0, **build)


class HookStorage(LocalStorage):
    """Real storage that runs ``hook`` (once) just before the first write of a shard file."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hook: object = None
        self.fail_on: str | None = None

    def put(self, key: str, data: bytes) -> None:
        if self.fail_on is not None and key.endswith(self.fail_on):
            raise OSError(f"injected crash writing {key}")
        if self.hook is not None and key.startswith("generations/"):
            hook, self.hook = self.hook, None
            hook()  # type: ignore[operator]
        super().put(key, data)


def test_cms_change_during_rebuild_is_in_the_new_generation(
    tmp_path: Path, make_record: RecordFactory
) -> None:
    storage = HookStorage(tmp_path / "store")
    published(storage, 2, *[make_record(f"i{i}", seed=i) for i in range(10)])
    serving = Searcher(storage)

    cms = make_record("cms-during-build", seed=99)
    storage.hook = lambda: write_records(storage, 2, cms)  # lands after the build's listing
    info = build_generation(storage, 2, grace_s=0.0)
    assert info.generation == 2
    assert serving.generation == 1 and serving.count() == 10  # N served throughout
    assert serving.reload_if_changed() and serving.generation == 2
    assert image_id_for("cms-during-build", "0") in live_ids(storage)
    assert info.pending(list_segments(storage)) == []


def test_crash_mid_build_keeps_previous_and_rerun_completes(
    tmp_path: Path, make_record: RecordFactory
) -> None:
    storage = HookStorage(tmp_path / "store")
    published(storage, 3, *[make_record(f"old-{i}", seed=i) for i in range(12)])
    write_records(storage, 3, *[make_record(f"new-{i}", seed=50 + i) for i in range(12)])
    before = load_manifest(storage)

    storage.fail_on = "shard-0002.faiss"
    with pytest.raises(OSError, match="injected"):
        build_generation(storage, 3, grace_s=0.0)
    assert load_manifest(storage) == before
    assert len(live_ids(storage)) == 12

    storage.fail_on = MANIFEST_KEY  # all shard files written, the publish itself fails
    with pytest.raises(OSError, match="injected"):
        build_generation(storage, 3, grace_s=0.0)
    assert load_manifest(storage) == before

    storage.fail_on = None
    info = build_generation(storage, 3, grace_s=0.0)
    assert info.generation == 2 and info.total_vectors == 24
    assert Applier(storage, grace_s=0.0).apply_once().segments == 0  # nothing left to apply


def test_rollback_and_live_apply_on_rolled_back_generation(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    write_run(storage, RunInfo("night-1", "cat", 3, 0.0))
    published(
        storage,
        2,
        *[make_record(f"i{i}", seed=i, run_id="night-1") for i in range(3)],
        run_id="night-1",
    )
    write_run(storage, RunInfo("night-2", "cat", 2, 0.0))
    published(
        storage,
        2,
        *[make_record(f"bad-{i}", seed=i, run_id="night-2") for i in range(2)],
        run_id="night-2",
    )
    assert live_ids(storage) == {image_id_for(f"bad-{i}", "0") for i in range(2)}

    assert rollback(storage).generation == 1
    searcher = Searcher(storage)
    assert searcher.generation == 1
    # CMS changes keep flowing into the rolled-back generation; the bad run's do not.
    write_records(storage, 2, make_record("cms", seed=5, run_id="adhoc"))
    report = Applier(storage, grace_s=0.0).apply_once()
    assert report.other_run == 2 and report.upserts == 1
    assert live_ids(storage) == {image_id_for(n, "0") for n in ("i0", "i1", "i2", "cms")}
    assert rollback(storage, 2).generation == 2
    with pytest.raises(GenerationError, match="not kept"):
        rollback(storage, 9)


def test_prune_keeps_policy_and_removes_unreferenced_files(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    for round_ in range(5):
        published(storage, 2, make_record(f"i{round_}", seed=round_))
        write_records(storage, 2, make_record(f"cms{round_}", seed=10 + round_))
        Applier(storage, grace_s=0.0).apply_once()  # a second revision of a shard
    rollback(storage, 4)
    report = prune(storage, keep_generations=2, keep_days=0.0, now_s=1e12)
    assert report.dropped_generations == [1, 2, 3]
    assert report.kept_generations == [4, 5]
    manifest = load_manifest(storage)
    assert manifest is not None and manifest.current_generation == 4
    referenced = set().union(*(g.files() for g in manifest.generations))
    on_disk = {k for k in storage.list("generations/")}
    assert on_disk == referenced  # old revisions and dropped generations are gone
    assert Searcher(storage).count() == manifest.current().total_vectors
    status_report = status(storage)
    assert status_report is not None
    assert [g["generation"] for g in status_report["generations"]] == [4, 5]


def test_prune_never_touches_a_build_in_progress(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    published(storage, 1, make_record("a", seed=1))
    storage.put("generations/000002/shard-0000.items.npz", b"being written")
    prune(storage, keep_generations=1, keep_days=0.0)
    assert storage.exists("generations/000002/shard-0000.items.npz")


def test_eval_reports_recall_against_exact(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    published(storage, 3, *[make_record(f"i{i}", seed=i) for i in range(60)])
    result = evaluate_generation(storage, queries=30)
    assert result["recall_at_k"] == 1.0  # Flat shards are exact
    assert result["queries"] == 30 and len(result["shard_recall_at_10"]) == 3
    searcher = Searcher(storage)
    scores, ids = searcher.search_ids(np.ones((2, 16), np.float32), k=5)
    assert ids.shape == (2, 5) and (np.diff(scores, axis=1) <= 0).all()
