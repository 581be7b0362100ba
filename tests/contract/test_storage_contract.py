"""The storage contract: what every ``Storage`` adapter does alike, run over local and S3.

The S3 side talks to moto's S3 server on loopback through boto3. What only one adapter
does (multipart uploads, lock files, client settings) is tested beside this, in
``tests/adapters/{local,s3}/test_storage.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from common.storage.base import ObjectNotFoundError, Storage, Versioned
from common.storage.cas import compare_then_put, read_versioned, write_if_unchanged
from common.storage.local import LocalStorage
from tests.support.storage import fresh_s3_storage


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return fresh_s3_storage(request.getfixturevalue("s3_endpoint"))


# --- plain objects ------------------------------------------------------------------------


def test_round_trip(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    storage.put("segments/shard-0000/a.seg", b"one")
    storage.put("segments/shard-0001/b.seg", b"two")
    storage.put("manifest.json", b"{}")
    assert storage.get("segments/shard-0000/a.seg") == b"one"
    assert storage.exists("manifest.json") and not storage.exists("nope")
    assert storage.list("segments/") == [
        "segments/shard-0000/a.seg",
        "segments/shard-0001/b.seg",
    ]
    assert "manifest.json" in storage.list()
    storage.delete("manifest.json")
    assert not storage.exists("manifest.json")
    with pytest.raises(ObjectNotFoundError):
        storage.get("manifest.json")


def test_a_put_replaces_the_whole_object(storage: Storage) -> None:
    storage.put("runs/r1.json", b"a much longer first version")
    storage.put("runs/r1.json", b"short")
    assert storage.get("runs/r1.json") == b"short"
    assert storage.list("runs/") == ["runs/r1.json"]


def test_list_matches_key_prefixes_not_only_folders(storage: Storage) -> None:
    assert storage.list() == [] and storage.list("segments/") == []
    for key in ("segments/shard-0000/a.seg", "segments/shard-0001/b.seg", "segmentsX"):
        storage.put(key, b"x")
    assert storage.list("segments/shard-000") == [
        "segments/shard-0000/a.seg",
        "segments/shard-0001/b.seg",
    ]
    assert storage.list("segments/shard-0001/") == ["segments/shard-0001/b.seg"]
    assert storage.list("segments") == [
        "segments/shard-0000/a.seg",
        "segments/shard-0001/b.seg",
        "segmentsX",
    ]
    assert storage.list("nothing/") == []


def test_deleting_a_missing_object_is_no_error(storage: Storage) -> None:
    storage.delete("never/written")
    assert not storage.exists("never/written")


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../b"])
def test_invalid_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, b"x")
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.get(key)


def test_local_path_is_absent_or_holds_the_bytes(storage: Storage) -> None:
    storage.put("generations/000001/shard-0000.faiss", b"index bytes")
    path = storage.local_path("generations/000001/shard-0000.faiss")
    assert path is None or path.read_bytes() == b"index bytes"


# --- downloads ----------------------------------------------------------------------------


def test_download_to_writes_the_object_into_a_file(storage: Storage, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.put("generations/000001/shard-0000.vectors.npy", data)
    target = tmp_path / "downloads" / "vectors.npy"
    target.parent.mkdir()
    target.write_bytes(b"an older copy")
    storage.download_to("generations/000001/shard-0000.vectors.npy", target)
    assert target.read_bytes() == data


def test_download_to_of_a_missing_object_is_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError):
        storage.download_to("generations/000001/missing.npy", tmp_path / "missing.npy")


# --- versioned reads and conditional writes -------------------------------------------------


def test_versioned_read(storage: Storage) -> None:
    assert storage.get_versioned("manifest.json") == Versioned(None, None)
    storage.put("manifest.json", b"v1")
    first = storage.get_versioned("manifest.json")
    assert first.data == b"v1" and first.token
    storage.put("manifest.json", b"v2")
    second = storage.get_versioned("manifest.json")
    assert second.data == b"v2" and second.token and second.token != first.token


def test_conditional_write_refuses_a_stale_writer(storage: Storage) -> None:
    assert storage.put_if_match("manifest.json", b"v1", None) is True
    assert storage.put_if_match("manifest.json", b"again", None) is False  # create-only
    data, token = storage.get_versioned("manifest.json")
    assert data == b"v1" and token
    assert storage.put_if_match("manifest.json", b"v2", token) is True
    # A second writer still holding the first token loses, and writes nothing.
    assert storage.put_if_match("manifest.json", b"v2-other", token) is False
    assert storage.get("manifest.json") == b"v2"


def test_conditional_write_after_a_delete_is_refused(storage: Storage) -> None:
    storage.put("cms/idempotency/k.json", b"claimed")
    _, token = storage.get_versioned("cms/idempotency/k.json")
    storage.delete("cms/idempotency/k.json")
    assert storage.put_if_match("cms/idempotency/k.json", b"mine", token) is False
    assert not storage.exists("cms/idempotency/k.json")


def test_racing_creators_exactly_one_wins(storage: Storage) -> None:
    barrier = threading.Barrier(6)
    won: list[bytes] = []

    def create(n: int) -> None:
        data = f"writer-{n}".encode()
        barrier.wait()
        if storage.put_if_match("manifest.json", data, None):
            won.append(data)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert storage.get("manifest.json") == won[0]


# --- the compare-and-swap helpers -----------------------------------------------------------


def test_cas_helpers(storage: Storage) -> None:
    assert read_versioned(storage, "manifest.json") == (None, None)
    assert write_if_unchanged(storage, "manifest.json", b"v1", None) is True
    assert write_if_unchanged(storage, "manifest.json", b"again", None) is False
    data, token = read_versioned(storage, "manifest.json")
    assert data == b"v1" and token
    assert write_if_unchanged(storage, "manifest.json", b"v2", token) is True
    # A second writer still holding the first token loses.
    assert write_if_unchanged(storage, "manifest.json", b"v2-other", token) is False
    assert storage.get("manifest.json") == b"v2"


def test_compare_then_put_compares_the_token(storage: Storage) -> None:
    assert compare_then_put(storage, "k.json", b"v1", None) is True
    assert compare_then_put(storage, "k.json", b"v1-again", None) is False
    _, token = storage.get_versioned("k.json")
    assert compare_then_put(storage, "k.json", b"v2", "not-the-token") is False
    assert compare_then_put(storage, "k.json", b"v2", token) is True
    assert storage.get("k.json") == b"v2"
