"""Stable identities: image id from (item id, image key).

Uses blake2b, never Python's ``hash()``, so every process on every host computes the same id.
"""

from __future__ import annotations

import hashlib

_MASK_63 = (1 << 63) - 1


def image_id_for(item_id: str, image_key: str) -> int:
    """A stable 63-bit id (fits FAISS's signed int64 ids)."""
    digest = hashlib.blake2b(
        item_id.encode("utf-8") + b"\x00" + image_key.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") & _MASK_63


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def job_id_for(run_id: str, image_id: int, op: str) -> str:
    """A deterministic job id: the same job published again (a resumed run) keeps its id."""
    digest = hashlib.blake2b(f"{run_id}\x00{image_id}\x00{op}".encode(), digest_size=16).hexdigest()
    return digest
