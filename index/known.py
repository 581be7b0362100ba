"""What the index already holds for an image: lets the fetcher skip unchanged images.

``KnownImages.lookup(image_id)`` answers from the serving generation, including the rows
live apply has added since it was built (each shard's delta table). A worker compares the
answer's ``etag`` / ``last_modified`` (conditional HTTP request) or ``content_hash`` with
what it fetched and, when nothing changed, writes a new record that reuses ``vector``
instead of decoding and embedding again.

Memory: per shard, sorted int64 ids plus byte-string columns; vectors stay in a
memory-mapped float16 file (page cache, not process memory). Shards load on first use.
Reloads are cheap: at most every ``check_interval_s`` the manifest is read, and only a
changed shard (new revision) is reloaded (``index.reader``).

Read path: imports nothing of build, apply or publish.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from common.storage.base import ObjectNotFoundError, Storage
from index.manifest import GenerationInfo, load_manifest
from index.reader import ShardCache, ShardTables, read_tables
from index.routing import shard_for
from index.shardfiles import text


@dataclass(frozen=True)
class KnownImage:
    image_id: int
    item_id: str
    version: int
    content_hash: str
    etag: str
    last_modified: str
    model_id: str
    vector: np.ndarray  # float16 [d], exactly as the worker wrote it


class KnownImages:
    """Thread-safe lookups against the manifest's current generation."""

    def __init__(
        self,
        storage: Storage,
        *,
        check_interval_s: float = 5.0,
        cache_dir: Path | None = None,
    ) -> None:
        self._storage = storage
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._gen: GenerationInfo | None = None
        self._serial: int | None = None
        self._shards: ShardCache[ShardTables] = ShardCache(
            partial(read_tables, storage, vectors=True, cache_dir=cache_dir)
        )
        self._checked_at_s = float("-inf")

    @property
    def generation(self) -> int | None:
        gen = self._gen
        return None if gen is None else gen.generation

    def refresh(self, force: bool = False) -> bool:
        """Re-read the manifest if due (or ``force``); True if the serving state changed."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked_at_s < self._check_interval_s:
                return False
            self._checked_at_s = now
            manifest = load_manifest(self._storage)
            if manifest is None:
                changed = self._gen is not None
                self._gen, self._serial = None, None
                self._shards.clear()
                return changed
            if manifest.serial == self._serial:
                return False
            gen = manifest.current()
            # Same generation: keep shards whose revision did not move; else none.
            self._shards.retain(gen)
            self._gen, self._serial = gen, manifest.serial
            return True

    def _loaded_for(self, image_id: int) -> tuple[ShardTables | None, GenerationInfo | None]:
        with self._lock:
            gen = self._gen
            if gen is None:
                return None, None
            return self._shards.get(gen, shard_for(image_id, gen.n_shards)), gen

    def lookup(self, image_id: int) -> KnownImage | None:
        """The live record of ``image_id``, or None (unknown, deleted, or no index yet)."""
        self.refresh()
        try:
            loaded, gen = self._loaded_for(image_id)
        except ObjectNotFoundError:
            # Prune removed a revision we had not loaded yet: the manifest has moved on.
            self.refresh(force=True)
            loaded, gen = self._loaded_for(image_id)
        if loaded is None or gen is None:
            return None
        found = loaded.current_row(image_id)
        if found is None:
            return None
        rows, row = found
        if bool(rows.tombstones[row]) or rows.vectors.shape[0] == 0:
            return None
        return KnownImage(
            image_id=image_id,
            item_id=text(rows.item_ids[row]),
            version=int(rows.versions[row]),
            content_hash=text(rows.content_hashes[row]),
            etag=text(rows.etags[row]),
            last_modified=text(rows.last_modifieds[row]),
            model_id=gen.model_id or "",
            vector=np.array(rows.vectors[row], dtype=np.float16),
        )
