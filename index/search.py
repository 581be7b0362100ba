"""Search one published generation: fan out over its shards, merge top-k, return items.

A loaded generation is an immutable snapshot held in one attribute; ``reload_if_changed``
builds the new snapshot completely before swapping it in, so a search running on another
thread sees either the old generation or the new one, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from common.storage import Storage
from index.manifest import GenerationInfo, load_manifest
from index.npz import unpack_arrays
from index.routing import shard_for

# Fetch this many candidates per wanted hit before collapsing; doubled until enough distinct
# items survive or the shard runs out, so collapse never returns fewer hits than exist.
_COLLAPSE_OVERFETCH = 4


@dataclass(frozen=True)
class Hit:
    item_id: str
    image_id: int
    score: float


@dataclass(frozen=True)
class _Shard:
    index: faiss.IndexIDMap2
    image_ids: np.ndarray  # int64, sorted ascending (the build writes them so)
    item_ids: np.ndarray  # unicode, aligned with image_ids

    def item_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Item ids for ids that are in this shard."""
        return self.item_ids[np.searchsorted(self.image_ids, image_ids)]

    def contains(self, image_id: int) -> bool:
        pos = int(np.searchsorted(self.image_ids, image_id))
        return pos < self.image_ids.shape[0] and int(self.image_ids[pos]) == image_id


@dataclass(frozen=True)
class _Generation:
    info: GenerationInfo
    shards: list[_Shard]

    @property
    def count(self) -> int:
        return sum(int(s.index.ntotal) for s in self.shards)


def _load_generation(storage: Storage, info: GenerationInfo) -> _Generation:
    shards = []
    for index_key, items_key in zip(info.shard_keys, info.item_keys, strict=True):
        index = faiss.deserialize_index(np.frombuffer(storage.get(index_key), dtype=np.uint8))
        if not isinstance(index, faiss.IndexIDMap2):
            # vector_of and image_ids rely on the id map; an unexpected type is a build bug.
            raise ValueError(f"{index_key!r} is a {type(index).__name__}, not an IndexIDMap2")
        items = unpack_arrays(storage.get(items_key))
        shards.append(_Shard(index=index, image_ids=items["image_id"], item_ids=items["item_id"]))
    return _Generation(info=info, shards=shards)


class Searcher:
    """Serves the manifest's current generation; empty until one is published."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._gen: _Generation | None = None
        self.reload_if_changed()

    @property
    def generation(self) -> int | None:
        gen = self._gen
        return None if gen is None else gen.info.generation

    @property
    def dim(self) -> int | None:
        gen = self._gen
        return None if gen is None else gen.info.dim

    def reload_if_changed(self) -> bool:
        """Switch to the manifest's current generation if it differs; True if switched."""
        manifest = load_manifest(self._storage)
        if manifest is None or manifest.current_generation == self.generation:
            return False
        self._gen = _load_generation(self._storage, manifest.current())
        return True

    def count(self) -> int:
        gen = self._gen
        return 0 if gen is None else gen.count

    def image_ids(self) -> np.ndarray:
        """Every image id in the generation (read from the FAISS id maps themselves)."""
        gen = self._gen
        if gen is None:
            return np.zeros(0, np.int64)
        parts = [faiss.vector_to_array(s.index.id_map).astype(np.int64) for s in gen.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def vector_of(self, image_id: int) -> np.ndarray | None:
        """The stored (normalised, float32) vector of an image, or None if it is absent."""
        gen = self._gen
        if gen is None:
            return None
        shard = gen.shards[shard_for(image_id, gen.info.n_shards)]
        if not shard.contains(image_id):
            return None
        return np.asarray(shard.index.reconstruct(image_id), dtype=np.float32)

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        collapse_items: bool = True,
        exclude_item_ids: list[set[str]] | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query row, best first, by inner product of unit vectors.

        With ``collapse_items`` an item appears once, as its best image. Items in
        ``exclude_item_ids[i]`` never appear in the hits of query ``i`` (e.g. the item the
        user is looking at).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.array(vectors, dtype=np.float32, ndmin=2)  # a copy: normalised in place
        if exclude_item_ids is not None and len(exclude_item_ids) != queries.shape[0]:
            raise ValueError(
                f"exclude_item_ids has {len(exclude_item_ids)} sets for {queries.shape[0]} queries"
            )
        gen = self._gen
        if gen is None or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
        if queries.ndim != 2 or queries.shape[1] != gen.info.dim:
            raise ValueError(f"queries must be (q, {gen.info.dim}), got {queries.shape}")
        faiss.normalize_L2(queries)

        needs_more = collapse_items or exclude_item_ids is not None
        per_shard_k = k * _COLLAPSE_OVERFETCH if needs_more else k
        largest_shard = max(int(s.index.ntotal) for s in gen.shards)
        while True:
            fetch_k = min(per_shard_k, max(largest_shard, 1))
            hits = self._search_once(gen, queries, fetch_k, k, collapse_items, exclude_item_ids)
            exhausted = fetch_k >= largest_shard
            if exhausted or all(len(row) == k for row in hits):
                return hits
            per_shard_k *= 2

    @staticmethod
    def _search_once(
        gen: _Generation,
        queries: np.ndarray,
        fetch_k: int,
        k: int,
        collapse_items: bool,
        exclude_item_ids: list[set[str]] | None,
    ) -> list[list[Hit]]:
        scores_parts, ids_parts, items_parts = [], [], []
        for shard in gen.shards:
            if shard.index.ntotal == 0:
                continue
            scores, ids = shard.index.search(queries, fetch_k)
            found = ids >= 0
            items = np.full(ids.shape, "", dtype=shard.item_ids.dtype)
            items[found] = shard.item_of(ids[found])
            scores_parts.append(np.where(found, scores, -np.inf))
            ids_parts.append(ids)
            items_parts.append(items)
        if not scores_parts:
            return [[] for _ in range(queries.shape[0])]
        all_scores = np.concatenate(scores_parts, axis=1)
        all_ids = np.concatenate(ids_parts, axis=1)
        all_items = np.concatenate(items_parts, axis=1)  # numpy widens the str dtype

        results: list[list[Hit]] = []
        for row in range(queries.shape[0]):
            # Ties broken by image id so results are deterministic across shard layouts.
            order = np.lexsort((all_ids[row], -all_scores[row]))
            excluded = exclude_item_ids[row] if exclude_item_ids is not None else set()
            seen: set[str] = set()
            row_hits: list[Hit] = []
            for col in order:
                image_id = int(all_ids[row, col])
                if image_id < 0:
                    break  # -inf scores sort last: only padding from here on
                item_id = str(all_items[row, col])
                if item_id in excluded or (collapse_items and item_id in seen):
                    continue
                seen.add(item_id)
                row_hits.append(Hit(item_id, image_id, float(all_scores[row, col])))
                if len(row_hits) == k:
                    break
            results.append(row_hits)
        return results
