"""The idempotency store: claim, replay, reuse, leases, expiry, and races between replicas."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from common.storage.local import LocalStorage
from producers.cms.idempotency import (
    Claim,
    IdempotencyStore,
    InProgress,
    KeyReused,
    Replay,
    key_hash,
    key_problem,
)
from tests.support.clock import FakeClock
from tests.support.races import race_processes

START_S = 1_000_000.0  # the stores' clocks start here


def _store(root: Path, clock: FakeClock | None = None, ttl_s: float = 3600) -> IdempotencyStore:
    return IdempotencyStore(
        LocalStorage(root), ttl_s=ttl_s, lease_s=40, clock=clock or FakeClock(START_S)
    )


def test_claim_then_complete_then_replay(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claim = store.begin("key-1", "fp-a")
    assert isinstance(claim, Claim)
    assert claim.storage_key == f"cms/idempotency/{key_hash('key-1')}.json"
    # While the first request runs, the same key is in progress (same body or not).
    assert store.begin("key-1", "fp-a") == InProgress()
    assert store.begin("key-1", "fp-b") == KeyReused()
    store.complete(claim, 202, b'{"accepted":1}')
    assert store.begin("key-1", "fp-a") == Replay(202, b'{"accepted":1}')
    assert store.begin("key-1", "fp-b") == KeyReused()
    # Other keys are independent.
    assert isinstance(store.begin("key-2", "fp-a"), Claim)


def test_the_record_survives_a_restart_and_is_shared_by_replicas(tmp_path: Path) -> None:
    first = _store(tmp_path)
    claim = first.begin("k", "fp")
    assert isinstance(claim, Claim)
    second = _store(tmp_path)  # another process, same storage
    assert second.begin("k", "fp") == InProgress()
    first.complete(claim, 202, b"{}")
    assert _store(tmp_path).begin("k", "fp") == Replay(202, b"{}")


def test_an_abandoned_claim_frees_the_key_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claim = store.begin("k", "fp")
    assert isinstance(claim, Claim)
    store.abandon(claim)
    again = store.begin("k", "fp-other")  # free: even another body may use it now
    assert isinstance(again, Claim)
    # Abandoning a claim that is no longer ours leaves the new holder alone.
    store.abandon(claim)
    assert store.begin("k", "fp-other") == InProgress()


def test_a_dead_holders_lease_runs_out_and_the_key_is_taken_over(tmp_path: Path) -> None:
    clock = FakeClock(START_S)
    store = _store(tmp_path, clock)
    dead = store.begin("k", "fp")
    assert isinstance(dead, Claim)
    clock.now_s += 39
    assert store.begin("k", "fp") == InProgress()
    clock.now_s += 2  # past the 40 s lease
    taken = store.begin("k", "fp")
    assert isinstance(taken, Claim) and taken.owner != dead.owner
    store.complete(taken, 202, b"{}")
    assert store.begin("k", "fp") == Replay(202, b"{}")


def test_completed_keys_expire_after_the_ttl_and_are_purged(tmp_path: Path) -> None:
    clock = FakeClock(START_S)
    store = _store(tmp_path, clock, ttl_s=100)
    for key in ("a", "b"):
        claim = store.begin(key, "fp")
        assert isinstance(claim, Claim)
        store.complete(claim, 202, b"{}")
    clock.now_s += 50
    late = store.begin("c", "fp")  # completes later, expires later
    assert isinstance(late, Claim)
    store.complete(late, 202, b"{}")
    assert store.begin("a", "fp") == Replay(202, b"{}")
    clock.now_s += 60  # a and b are 110 s old, c 60 s
    assert store.purge_expired() == 2
    assert len([k for k in store.storage.list("cms/idempotency/") if k.endswith(".json")]) == 1
    # An expired key is a new key: claimable, with any body.
    assert isinstance(store.begin("a", "fp-new"), Claim)
    assert store.begin("c", "fp") == Replay(202, b"{}")


def test_an_unreadable_record_counts_as_absent(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.storage.put(store.storage_key("k"), b"not json")
    assert isinstance(store.begin("k", "fp"), Claim)
    store.storage.put(store.storage_key("j"), orjson.dumps({"state": "weird"}))
    assert store.purge_expired() == 1


def test_threads_racing_for_one_key_get_exactly_one_claim(tmp_path: Path) -> None:
    store = _store(tmp_path)
    outcomes: list[object] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        outcomes.append(store.begin("contended", "fp"))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(o, Claim) for o in outcomes) == 1
    assert all(isinstance(o, Claim | InProgress) for o in outcomes)


def _claim_in_process(_n: int, root: str) -> bool:
    return isinstance(_store(Path(root)).begin("contended", "fp"), Claim)


def test_processes_racing_for_one_key_get_exactly_one_claim(tmp_path: Path) -> None:
    claimed = race_processes(_claim_in_process, str(tmp_path))
    assert claimed.count(True) == 1


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "must be 1 to 255 characters"),
        ("x" * 256, "must be 1 to 255 characters"),
        (" k", "must be printable ASCII without leading or trailing spaces"),
        ("k\u00e9", "must be printable ASCII without leading or trailing spaces"),
        ("k\tx", "must be printable ASCII without leading or trailing spaces"),
    ],
)
def test_bad_keys_are_named(key: str, problem: str) -> None:
    assert key_problem(key) == problem


def test_good_keys_pass() -> None:
    assert key_problem("0b7d4f3e-1c2a-4e5f-9a8b-7c6d5e4f3a2b") is None
    assert key_problem("x" * 255) is None


@pytest.mark.integration
def test_on_s3_claims_are_conditional_writes(s3_endpoint: str) -> None:
    from common.config import Settings, StorageConfig
    from imgfleet.factories import make_storage
    from tests.conftest import s3_client

    s3_client(s3_endpoint).create_bucket(Bucket="cms-idem")
    storage = make_storage(
        Settings(
            storage=StorageConfig(
                kind="s3",
                s3_bucket="cms-idem",
                s3_endpoint_url=s3_endpoint,
                s3_access_key_id="test",  # type: ignore[arg-type]
                s3_secret_access_key="test",  # type: ignore[arg-type]
            )
        )
    )
    clock = FakeClock(START_S)
    stores = [IdempotencyStore(storage, ttl_s=100, lease_s=40, clock=clock) for _ in range(6)]
    outcomes: list[object] = []
    barrier = threading.Barrier(len(stores))

    def race(store: IdempotencyStore) -> None:
        barrier.wait()
        outcomes.append(store.begin("s3-key", "fp"))

    threads = [threading.Thread(target=race, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claims = [o for o in outcomes if isinstance(o, Claim)]
    assert len(claims) == 1
    stores[0].complete(claims[0], 202, b'{"ok":true}')
    assert stores[3].begin("s3-key", "fp") == Replay(202, b'{"ok":true}')
    assert stores[3].begin("s3-key", "other") == KeyReused()
    clock.now_s += 101
    assert stores[1].purge_expired() == 1
    assert storage.list("cms/idempotency/") == []
