"""Live apply's operating signals: generation and shard gauges, apply delay, cycle
outcomes and readiness."""

from __future__ import annotations

import time

import pytest

from common.observability.health import Health
from common.observability.metrics import Metrics
from common.storage.local import LocalStorage
from index.apply import Applier
from index.manifest import load_manifest
from index.publish import build_generation
from tests.unit.index.conftest import RecordFactory, write_records


def test_a_cycle_sets_the_index_gauges(storage: LocalStorage, make_record: RecordFactory) -> None:
    write_records(storage, 2, *[make_record(f"base-{i}", seed=i) for i in range(12)])
    build_generation(storage, 2, grace_s=0.0)
    metrics, health = Metrics(), Health(stall_after_s=60)
    applier = Applier(storage, grace_s=0.0, metrics=metrics, health=health)

    applier.apply_once()  # nothing pending yet
    assert metrics.value("imgfleet_live_apply_delay_seconds") == 0
    assert health.ready is True

    written_before_s = time.time()
    write_records(
        storage,
        2,
        make_record("new-1", seed=50),
        make_record("new-2", seed=51),
        make_record("base-0", version=2, vector=None),
    )
    time.sleep(0.2)  # the delay measured below is at least this
    report = applier.apply_once()
    published_s = time.time()

    gen = load_manifest(storage).current()  # type: ignore[union-attr]
    assert metrics.value("imgfleet_index_generation") == gen.generation
    for shard in gen.shards:
        assert metrics.value("imgfleet_index_shard_vectors", shard=str(shard.shard)) == (
            shard.vectors
        )
    assert sum(s.vectors for s in gen.shards) == 12 + 2 - 1
    delay_s = metrics.value("imgfleet_live_apply_delay_seconds")
    assert 0.2 <= delay_s <= published_s - written_before_s + 0.01
    assert metrics.value("imgfleet_index_applied_records_total", op="upsert") == report.upserts == 2
    assert metrics.value("imgfleet_index_applied_records_total", op="delete") == report.deletes == 1
    assert metrics.value("imgfleet_index_apply_cycles_total", outcome="ok") == 2
    assert metrics.value("imgfleet_index_apply_last_success_timestamp_seconds") >= published_s - 5


def test_a_failed_cycle_is_counted_and_makes_the_applier_unready(
    storage: LocalStorage, make_record: RecordFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_records(storage, 2, *[make_record(f"base-{i}", seed=i) for i in range(6)])
    build_generation(storage, 2, grace_s=0.0)
    metrics, health = Metrics(), Health(stall_after_s=60)
    applier = Applier(storage, grace_s=0.0, metrics=metrics, health=health)
    applier.apply_once()
    assert health.ready is True

    write_records(storage, 2, make_record("new-1", seed=9))

    def broken(*_: object) -> object:
        raise OSError("storage unreachable")

    monkeypatch.setattr(applier, "_apply", broken)
    with pytest.raises(OSError):
        applier.apply_once()
    assert metrics.value("imgfleet_index_apply_cycles_total", outcome="error") == 1
    assert health.ready is False
    monkeypatch.undo()
    applier.apply_once()
    assert health.ready is True
