"""The local-directory storage adapter: keys are '/'-separated paths under one root.

- ``put`` is ``common.files.write_atomic``: a temp file beside the object, fsync'd and
  ``os.replace``d into place, then the directory fsync'd; a crash leaves the old object
  or the new one, never half of one.
- ``put_if_match`` holds an exclusive ``flock`` on the directory's ``.lock`` file around
  ``common.storage.cas.compare_then_put``; the version token is a SHA-256 of the bytes.
  Safe for processes (and threads: each call opens its own descriptor) that share one
  filesystem. One lock per directory, not per object: a lock file can never be removed
  while another process may be waiting on it, so per-object locks would leave a file
  behind for every key ever written (the CMS intake writes one per request). Claims and
  manifest writes are a read and a small write, so serialising a directory costs nothing.
- ``list`` hides the adapter's own files (temp files, lock files): they are not objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from common.files import TEMP_PREFIX, write_atomic
from common.storage.base import ObjectNotFoundError, Versioned, check_key
from common.storage.cas import compare_then_put, content_token

_LOCK_NAME = ".lock"
# Also hides the per-object ``.lock-<name>`` files that earlier versions left beside the
# manifest.
_INTERNAL_PREFIXES = (TEMP_PREFIX, _LOCK_NAME)


class LocalStorage:
    """A directory tree; keys are '/'-separated relative paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # The root is made by the first write, not here: read-only commands (status, search,
        # a dry run) open storage too and must leave no ./imgfleet-data behind. Every read
        # already treats a missing folder as empty.
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _missing(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"no object {key!r} in {self.root}")

    def put(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise self._missing(key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk the one directory that holds every match: the prefix itself when it names a
        # folder ("segments/"), else its parent ("segments" also matches "segmentsX").
        folder = not prefix or prefix.endswith("/")
        search_root = self.root / prefix if folder else (self.root / prefix).parent
        if not search_root.is_dir():
            return []
        keys = []
        for path in search_root.rglob("*"):
            if path.is_file() and not path.name.startswith(_INTERNAL_PREFIXES):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def download_to(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            shutil.copyfile(source, path)
        except FileNotFoundError as exc:
            if source.is_file():
                raise  # the destination's directory is what is missing
            raise self._missing(key) from exc

    def get_versioned(self, key: str) -> Versioned:
        # Through get(), so that a subclass standing in for a failing store fails here too.
        try:
            data = self.get(key)
        except ObjectNotFoundError:
            return Versioned(None, None)
        return Versioned(data, content_token(data))

    def put_if_match(self, key: str, data: bytes, expected_token: str | None) -> bool:
        with _directory_lock(self._path(key).parent):
            return compare_then_put(self, key, data, expected_token)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
