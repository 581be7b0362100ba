"""What only the local-directory storage does: its own files, its lock, its failure modes.

The behaviour every adapter shares is in ``tests/contract/test_storage_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import Reason, TransientError
from common.storage.local import LocalStorage
from tests.support.races import race_processes


def test_temp_and_lock_files_are_not_objects(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.put_if_match("cms/idempotency/a.json", b"{}", None) is True
    assert (tmp_path / "cms/idempotency/.lock").is_file()  # one lock for the directory
    (tmp_path / "cms/idempotency/.tmp-crashed-writer").write_bytes(b"half")
    (tmp_path / ".lock-manifest.json").write_bytes(b"")  # what earlier versions left
    assert storage.put_if_match("manifest.json", b"{}", None) is True
    assert storage.list() == ["cms/idempotency/a.json", "manifest.json"]
    assert storage.list("cms/idempotency/") == ["cms/idempotency/a.json"]


def test_a_failed_put_keeps_the_old_object_and_leaves_no_temp_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("runs/r1.json", b"old")
    with pytest.raises(TypeError):
        storage.put("runs/r1.json", "not bytes")  # type: ignore[arg-type]
    assert storage.get("runs/r1.json") == b"old"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1.json"]


def test_local_path_is_the_file_under_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("generations/000001/shard-0000.faiss", b"index")
    assert storage.local_path("generations/000001/shard-0000.faiss") == (
        tmp_path / "generations/000001/shard-0000.faiss"
    )


def test_download_into_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put("a.bin", b"x")
    with pytest.raises(FileNotFoundError):
        storage.download_to("a.bin", tmp_path / "no-such-dir" / "a.bin")


class _UnreachableStorage(LocalStorage):
    def get(self, key: str) -> bytes:
        raise TransientError("storage unreachable", Reason.STORAGE)


def test_versioned_reads_go_through_get(tmp_path: Path) -> None:
    # A stand-in for a failing store fails its versioned reads (and so its claims) too.
    storage = _UnreachableStorage(tmp_path)
    with pytest.raises(TransientError):
        storage.get_versioned("cms/idempotency/a.json")
    with pytest.raises(TransientError):
        storage.put_if_match("cms/idempotency/a.json", b"{}", None)


def _create_in_process(n: int, root: str) -> bool:
    return LocalStorage(root).put_if_match("manifest.json", f"writer-{n}".encode(), None)


def test_processes_racing_to_create_exactly_one_wins(tmp_path: Path) -> None:
    won = race_processes(_create_in_process, str(tmp_path))
    assert won.count(True) == 1
    winner = won.index(True)
    assert LocalStorage(tmp_path).get("manifest.json") == f"writer-{winner}".encode()


def test_opening_storage_creates_nothing_until_the_first_write(tmp_path: Path) -> None:
    root = tmp_path / "imgfleet-data" / "store"
    storage = LocalStorage(root)
    assert storage.list() == [] and not storage.exists("manifest.json")
    assert storage.get_versioned("manifest.json").data is None
    storage.delete("nothing")
    assert not (tmp_path / "imgfleet-data").exists()  # reads and a no-op delete made nothing
    assert storage.put_if_match("manifest.json", b"{}", None)
    storage.put("segments/a.npz", b"x")
    assert storage.list() == ["manifest.json", "segments/a.npz"]
