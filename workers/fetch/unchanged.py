"""Skip decode and embedding for images that did not change since they were indexed.

A nightly reindex of a catalogue that barely changed should cost a fraction of the first
run. For each upsert the worker asks the index what it already holds for the image (the
``KnownLookup`` protocol; ``index.known.KnownImages`` in production, a dict in tests):

- known, embedded by the same model: the fetch is conditional (If-None-Match /
  If-Modified-Since from the stored ETag / Last-Modified); a 304 means unchanged;
- a full body whose content hash equals the stored one is unchanged too (origins without
  validators, or ones that ignore them);
- unchanged: the stored vector is written again in a new record (new version, this run's
  id), so the run's segments still hold every image of the run, and the pixels are never
  decoded or embedded.

A lookup that fails (index unreadable, shard missing) counts as "unknown": the image is
processed in full, never failed for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.observability.logging import get_logger


class KnownRecord(Protocol):
    @property
    def content_hash(self) -> str: ...
    @property
    def etag(self) -> str: ...
    @property
    def last_modified(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def vector(self) -> np.ndarray: ...


class KnownLookup(Protocol):
    def lookup(self, image_id: int) -> KnownRecord | None: ...


@dataclass(frozen=True)
class Reuse:
    """What an unchanged image's new record takes from the stored one."""

    vector: np.ndarray
    content_hash: str
    etag: str
    last_modified: str


class UnchangedImages:
    """Looks up known images and decides whether a fetch result is unchanged."""

    def __init__(self, known: KnownLookup | None, model_id: str) -> None:
        self.known = known
        self.model_id = model_id
        self.lookup_failures = 0
        self._log = get_logger("unchanged")

    async def lookup(self, image_id: int) -> KnownRecord | None:
        """The stored record if it can be reused by this model, else None."""
        if self.known is None:
            return None
        try:
            record = await asyncio.to_thread(self.known.lookup, image_id)
        except Exception as exc:  # the index is an optimisation here, never a failure
            self.lookup_failures += 1
            if self.lookup_failures == 1 or self.lookup_failures % 1000 == 0:
                self._log.warning(
                    "known-image lookup failed; processing in full",
                    error=f"{type(exc).__name__}: {exc}",
                    failures=self.lookup_failures,
                )
            return None
        if record is None or record.model_id != self.model_id:
            return None
        if record.vector is None or np.asarray(record.vector).size == 0:
            return None
        return record

    @staticmethod
    def reuse(
        record: KnownRecord | None,
        *,
        not_modified: bool,
        content_hash: str,
        etag: str | None,
        last_modified: str | None,
    ) -> Reuse | None:
        """A Reuse when the fetch shows the image unchanged, else None."""
        if record is None:
            return None
        if not_modified:
            return Reuse(
                vector=np.asarray(record.vector),
                content_hash=record.content_hash,
                etag=etag or record.etag,
                last_modified=last_modified or record.last_modified,
            )
        if record.content_hash and content_hash == record.content_hash:
            return Reuse(
                vector=np.asarray(record.vector),
                content_hash=content_hash,
                etag=etag or "",
                last_modified=last_modified or "",
            )
        return None
