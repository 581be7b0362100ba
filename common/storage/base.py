"""The storage protocol every adapter implements (``local.py``, ``s3.py``).

Objects live under '/'-separated keys (no leading '/', no '..') and are written whole or
not at all: a reader sees the old bytes or the new ones, never half of either.

Besides plain reads and writes, ``Storage`` carries what the index and the CMS intake
build on: a versioned read and a conditional write (the compare-and-swap of one small
object, ``common.storage.cas``), and a streamed download into a file (shard vectors are
too big to hold as bytes). Each adapter implements all of them; how it makes the
conditional write atomic is its own business (``flock`` on a directory, ``If-Match`` on
S3) and is described in its module.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from common.errors import PermanentError, Reason


class ObjectNotFoundError(PermanentError):
    reason = Reason.STORAGE


class Versioned(NamedTuple):
    """An object's bytes and the version token a conditional write compares.

    Both are None when there is no such object. The token is opaque (an ETag, a digest):
    compare it for equality, never parse it.
    """

    data: bytes | None
    token: str | None


@runtime_checkable
class Storage(Protocol):
    def put(self, key: str, data: bytes) -> None:
        """Write the object whole, replacing any earlier one."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; ``ObjectNotFoundError`` when there is none."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; nothing happens when there is none."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for the key where one exists (lets FAISS mmap shards)."""
        ...

    def download_to(self, key: str, path: Path) -> None:
        """Write the object into the file at ``path``, streamed where the adapter can.

        ``ObjectNotFoundError`` when there is none. Not atomic by itself: a caller that
        must never expose a partial file downloads to ``common.files.replacing``'s path.
        """
        ...

    def get_versioned(self, key: str) -> Versioned:
        """The bytes with their version token; ``Versioned(None, None)`` when absent."""
        ...

    def put_if_match(self, key: str, data: bytes, expected_token: str | None) -> bool:
        """Write if the object still has ``expected_token`` (None: only if it is absent).

        False, with nothing written, when another writer got there first.
        """
        ...


def check_key(key: str) -> str:
    """``key`` if it is a valid storage key, else ``ValueError`` (same rule everywhere)."""
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key
