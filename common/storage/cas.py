"""Compare-and-swap writes of one small object (the manifest).

Three ways, picked by what the storage offers:

- storage with ``get_versioned`` / ``put_if_match`` (``common.storage.s3.S3Storage``): the
  object store's own conditional write (``If-Match`` on the ETag, ``If-None-Match: *`` for
  the first write), so concurrent writers on different hosts cannot overwrite each other.
- storage with a local path (``LocalStorage``): an exclusive ``flock`` on a lock file next
  to the object around read-compare-replace; the replace itself is the adapter's atomic
  temp file + fsync + ``os.replace``. Safe for processes sharing one filesystem.
- anything else: compare, then put. Not atomic; a deployment on such storage must run one
  index writer at a time (one ``index apply`` loop, builds under the same scheduler).

The token is opaque to callers: an ETag, or a SHA-256 of the bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from common.storage.base import Storage


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_versioned(storage: Storage, key: str) -> tuple[bytes | None, str | None]:
    """(bytes, token), or (None, None) when the object does not exist."""
    get_versioned = getattr(storage, "get_versioned", None)
    if get_versioned is not None:
        data, token = get_versioned(key)
        return data, token
    if not storage.exists(key):
        return None, None
    data = storage.get(key)
    return data, _digest(data)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock_path = path.with_name(f".lock-{path.name}")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_if_unchanged(storage: Storage, key: str, data: bytes, expected_token: str | None) -> bool:
    """Write ``data`` if the object still has ``expected_token`` (None: does not exist)."""
    put_if_match = getattr(storage, "put_if_match", None)
    if put_if_match is not None:
        return bool(put_if_match(key, data, expected_token))
    local = storage.local_path(key)
    lock = _file_lock(local) if local is not None else contextlib.nullcontext()
    with lock:
        _, token = read_versioned(storage, key)
        if token != expected_token:
            return False
        storage.put(key, data)
        return True
