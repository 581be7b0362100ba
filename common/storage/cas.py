"""Compare-and-swap of one small object: the index manifest, a CMS idempotency record.

A writer reads the object with its version token (``read_versioned``), decides what to
write, and writes only if the token has not moved since (``write_if_unchanged``). A writer
that lost the race gets False, re-reads and decides again. The token is opaque to
callers: an ETag on S3, a SHA-256 of the bytes on the local directory.

The atomicity comes from the adapter's ``Storage.put_if_match``:

- S3 (``common.storage.s3``): the object store's own conditional ``PutObject``
  (``If-Match`` on the ETag, ``If-None-Match: *`` for the first write), so writers on
  different hosts cannot overwrite each other.
- the local directory (``common.storage.local``): an exclusive ``flock`` held around
  ``compare_then_put``, whose put is the atomic temp file + fsync + ``os.replace``. Safe
  for processes sharing one filesystem.
- S3 with ``conditional_writes=False`` (an endpoint that ignores the headers):
  ``compare_then_put`` without a lock. Not atomic; such a deployment must run one writer
  at a time (one ``index apply`` loop, builds under the same scheduler; the README says so).
"""

from __future__ import annotations

import hashlib

from common.storage.base import Storage, Versioned


def read_versioned(storage: Storage, key: str) -> Versioned:
    """(bytes, token), or (None, None) when the object does not exist."""
    return storage.get_versioned(key)


def write_if_unchanged(storage: Storage, key: str, data: bytes, expected_token: str | None) -> bool:
    """Write ``data`` if the object still has ``expected_token`` (None: does not exist)."""
    return storage.put_if_match(key, data, expected_token)


def content_token(data: bytes) -> str:
    """The version token of storage without its own: a digest of the bytes."""
    return hashlib.sha256(data).hexdigest()


def compare_then_put(storage: Storage, key: str, data: bytes, expected_token: str | None) -> bool:
    """Put if the token is still ``expected_token``: atomic only under the caller's lock."""
    if storage.get_versioned(key).token != expected_token:
        return False
    storage.put(key, data)
    return True
