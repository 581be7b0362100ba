"""Read the shards of a generation: the one revision-aware shard cache every reader uses.

A shard's files never change once a manifest names them: every change (live apply,
compaction, retrain) writes new files and gives the shard a new ``ShardInfo`` with the
next revision (``index.manifest``). So a shard loaded from a ``ShardInfo`` stays valid
exactly as long as the manifest names that same ``ShardInfo`` in the same generation.
``ShardCache`` keeps those and loads the others: a reload after a live apply cycle costs
only the shards whose revision moved, and a new generation is loaded whole.

What is loaded is the caller's choice (``load``): the searcher (``index.search``) holds
FAISS indexes and the row tables without vectors; the known-image lookup
(``index.known``) holds the row tables with memory-mapped vectors and no index; live
apply (``index.apply``) holds both and changes them, so it ``take``s a shard out of the
cache while it does and ``put``s it back once its revision is published. ``read_tables``
and ``open_index`` are the loading steps they share.

The cache itself is not thread-safe: each caller serialises its use (a lock, or one
thread), and hands its readers an immutable snapshot where they run concurrently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import faiss

from common.storage.base import Storage
from index.faiss_io import load_index, set_nprobe
from index.manifest import GenerationInfo, ShardInfo
from index.shardfiles import ShardRows, empty_rows, read_base, read_delta


@dataclass(frozen=True)
class ShardTables:
    """A shard's row tables at one revision: the build's base and live apply's delta."""

    info: ShardInfo
    base: ShardRows  # vectors memory-mapped, or a zero-width placeholder (see read_tables)
    delta: ShardRows  # empty until live apply changes the shard; vectors inline

    def current_row(self, image_id: int) -> tuple[ShardRows, int] | None:
        """Where ``image_id``'s record is: its delta row if there is one, else its base row."""
        for rows in (self.delta, self.base):
            row = rows.row_of(image_id)
            if row is not None:
                return rows, row
        return None


def read_tables(
    storage: Storage,
    gen: GenerationInfo,
    info: ShardInfo,
    *,
    vectors: bool,
    cache_dir: Path | None = None,
) -> ShardTables:
    """A shard's tables; with ``vectors`` the base vectors are memory-mapped where the
    storage has a local path (copied into ``cache_dir`` first otherwise)."""
    base = read_base(
        storage,
        info.items_key,
        info.vectors_key,
        gen.dim,
        load_vectors=vectors,
        cache_dir=cache_dir,
    )
    delta = read_delta(storage, info.delta_key, gen.dim) if info.delta_key else empty_rows(gen.dim)
    return ShardTables(info=info, base=base, delta=delta)


def open_index(storage: Storage, info: ShardInfo) -> faiss.Index:
    """A shard's FAISS index, probing the ``nprobe`` its build tuned."""
    index = load_index(storage, info.index_key)
    set_nprobe(index, int(info.params.get("nprobe", 1)))
    return index


S = TypeVar("S", bound=ShardTables)


class ShardCache(Generic[S]):
    """Loaded shards by (generation, shard), each valid for the ``ShardInfo`` it was loaded at."""

    def __init__(self, load: Callable[[GenerationInfo, ShardInfo], S]) -> None:
        self._load = load
        self._loaded: dict[tuple[int, int], S] = {}

    def get(self, gen: GenerationInfo, shard: int) -> S:
        """Shard ``shard`` of ``gen``: the cached one if its revision did not move, else
        loaded (and cached)."""
        loaded = self.take(gen, shard)
        self._loaded[(gen.generation, shard)] = loaded
        return loaded

    def take(self, gen: GenerationInfo, shard: int) -> S:
        """Like ``get``, but out of the cache: for a caller about to change it."""
        info = gen.shards[shard]
        cached = self._loaded.pop((gen.generation, shard), None)
        if cached is not None and cached.info == info:
            return cached
        return self._load(gen, info)

    def put(self, generation: int, loaded: S) -> None:
        """Cache a shard of ``generation`` as it is now (its ``info`` is its new revision)."""
        self._loaded[(generation, loaded.info.shard)] = loaded

    def retain(self, gen: GenerationInfo) -> None:
        """Keep only the shards ``gen`` names as they are: drop other generations and
        shards whose revision moved."""
        self._loaded = {
            key: loaded
            for key, loaded in self._loaded.items()
            if key[0] == gen.generation
            and key[1] < len(gen.shards)
            and loaded.info == gen.shards[key[1]]
        }

    def forget(self, generation: int) -> None:
        self._loaded = {key: v for key, v in self._loaded.items() if key[0] != generation}

    def clear(self) -> None:
        self._loaded = {}
