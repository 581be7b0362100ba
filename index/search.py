"""Search one generation: fan out over its shards, merge top-k, collapse images into items.

IVF shards that share a coarse quantizer (every IVF shard of a generation built here, see
``index.training``; recognised by the fingerprint of the centroids actually loaded) are
searched as one index would be: the query batch is assigned to its ``nprobe`` lists once,
then each shard scans only its own part of those lists (``search_preassigned``). The scans
run side by side in a small pool whose threads use one OpenMP thread each, over shards
and slices of the batch, so a batch of any size keeps every core busy. A lone IVF shard
(one shard, or one trained on its own) goes the same way as a group of one. Flat shards
are searched whole.

A loaded generation is an immutable snapshot held in one attribute; ``reload_if_changed``
builds the new snapshot completely before swapping it in, so a search running on another
thread sees either the old state or the new one, never a mix. A reload after live apply
only reloads the shards whose revision moved (``index.reader``).

Read path: imports nothing of build, apply or publish.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import faiss
import numpy as np

from common.storage.base import Storage
from index.faiss_io import coarse_id, set_nprobe
from index.manifest import GenerationInfo, ShardInfo, load_manifest
from index.reader import ShardCache, ShardTables, open_index, read_tables
from index.routing import shard_for
from index.shardfiles import text

# Fetch this many candidates per wanted hit before collapsing; doubled until enough distinct
# items survive or the shard runs out, so collapse never returns fewer hits than exist.
_COLLAPSE_OVERFETCH = 4
# Below this many queries a batch is too small for FAISS to spread over cores by itself,
# so shards searched whole are searched side by side instead.
_PARALLEL_SHARDS_BELOW_QUERIES = 8

# Below this many queries per worker, a batch is not cut into slices: its shards are
# scanned side by side instead.
_MIN_SLICE_QUERIES = 4

_Part = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _one_omp_thread() -> None:
    # OpenMP's thread count is per calling thread: pool threads scan one shard each
    # without spawning teams that would fight over the same cores.
    faiss.omp_set_num_threads(1)


@dataclass(frozen=True)
class Hit:
    item_id: str
    image_id: int
    score: float


@dataclass(frozen=True)
class _Shard(ShardTables):
    """A shard as a searcher holds it: its index, and its tables without vectors."""

    index: faiss.Index
    coarse: str | None  # fingerprint of the IVF coarse centroids; None for Flat

    def _locate(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(in delta, row in delta, row in base) per id."""
        dpos, in_delta = self.delta.find(image_ids)
        bpos, _ = self.base.find(image_ids)
        return in_delta, dpos, bpos

    def item_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Item ids (UTF-8 bytes) for ids that are in this shard."""
        in_delta, dpos, bpos = self._locate(image_ids)
        if len(self.delta) == 0:
            return self.base.item_ids[bpos]
        width = max(self.base.item_ids.dtype.itemsize, self.delta.item_ids.dtype.itemsize)
        out = self.base.item_ids[bpos].astype(f"S{width}")
        out[in_delta] = self.delta.item_ids[dpos[in_delta]]
        return out

    def is_live(self, image_id: int) -> bool:
        found = self.current_row(image_id)
        return found is not None and not bool(found[0].tombstones[found[1]])

    def live_ids(self) -> np.ndarray:
        _, in_delta = self.delta.find(self.base.image_ids)
        base_live = self.base.image_ids[~self.base.tombstones & ~in_delta]
        delta_live = self.delta.image_ids[~self.delta.tombstones]
        return np.sort(np.concatenate([base_live, delta_live]))

    def images_of_item(self, item_id: bytes) -> np.ndarray:
        ids = [
            rows.image_ids[(rows.item_ids == item_id) & ~rows.tombstones]
            for rows in (self.base, self.delta)
        ]
        found = np.unique(np.concatenate(ids))
        return np.array([i for i in found if self.is_live(int(i))], dtype=np.int64)


@dataclass(frozen=True)
class _Generation:
    info: GenerationInfo
    serial: int
    shards: list[_Shard]

    @property
    def count(self) -> int:
        return sum(int(s.index.ntotal) for s in self.shards)


def _load_shard(storage: Storage, gen: GenerationInfo, info: ShardInfo) -> _Shard:
    index = open_index(storage, info)
    tables = read_tables(storage, gen, info, vectors=False)
    coarse = coarse_id(index) if isinstance(index, faiss.IndexIVF) else None
    return _Shard(info=info, base=tables.base, delta=tables.delta, index=index, coarse=coarse)


class Searcher:
    """Serves the manifest's current generation (or a pinned one); empty until published.

    With ``auto_reload_s`` a search first re-reads the manifest when that many seconds
    have passed since the last check; otherwise call ``reload_if_changed``.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        generation: int | None = None,
        auto_reload_s: float | None = None,
        nprobe: int | None = None,
    ) -> None:
        self._storage = storage
        self._pinned = generation
        self._auto_reload_s = auto_reload_s
        self._nprobe = nprobe
        self._gen: _Generation | None = None
        self._shards: ShardCache[_Shard] = ShardCache(partial(_load_shard, storage))
        self._checked_at_s = time.monotonic()
        self._reload_lock = threading.Lock()
        self._workers = max(faiss.omp_get_max_threads(), 1)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, initializer=_one_omp_thread)
        self.reload_if_changed()

    @property
    def generation(self) -> int | None:
        gen = self._gen
        return None if gen is None else gen.info.generation

    @property
    def info(self) -> GenerationInfo | None:
        gen = self._gen
        return None if gen is None else gen.info

    @property
    def dim(self) -> int | None:
        gen = self._gen
        return None if gen is None else gen.info.dim

    def reload_if_changed(self) -> bool:
        """Switch to the manifest's current state if it differs; True if anything changed."""
        with self._reload_lock:
            self._checked_at_s = time.monotonic()
            manifest = load_manifest(self._storage)
            if manifest is None:
                return False
            old = self._gen
            if old is not None and old.serial == manifest.serial:
                return False
            want = self._pinned or manifest.current_generation
            info = manifest.get(want)
            if old is not None and old.info == info:
                self._gen = _Generation(info=info, serial=manifest.serial, shards=old.shards)
                return False
            shards = [self._shards.get(info, s.shard) for s in info.shards]
            if self._nprobe:
                for shard in shards:
                    set_nprobe(shard.index, self._nprobe)
            self._shards.retain(info)
            self._gen = _Generation(info=info, serial=manifest.serial, shards=shards)
            return True

    def _maybe_reload(self) -> None:
        if self._auto_reload_s is None:
            return
        if time.monotonic() - self._checked_at_s >= self._auto_reload_s:
            self.reload_if_changed()

    def set_nprobe(self, nprobe: int) -> None:
        """Override every shard's tuned ``nprobe`` (evaluation and benchmarks)."""
        self._nprobe = nprobe
        gen = self._gen
        for shard in gen.shards if gen else []:
            set_nprobe(shard.index, nprobe)

    def count(self) -> int:
        gen = self._gen
        return 0 if gen is None else gen.count

    def image_ids(self) -> np.ndarray:
        """Every live image id in the generation."""
        gen = self._gen
        if gen is None:
            return np.zeros(0, np.int64)
        parts = [s.live_ids() for s in gen.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def vector_of(self, image_id: int) -> np.ndarray | None:
        """The stored (normalised, float32; quantised for IVF) vector of an image, or None."""
        gen = self._gen
        if gen is None:
            return None
        shard = gen.shards[shard_for(image_id, gen.info.n_shards)]
        if not shard.is_live(image_id):
            return None
        return np.asarray(shard.index.reconstruct(image_id), dtype=np.float32)

    def images_of_item(self, item_id: str) -> np.ndarray:
        gen = self._gen
        if gen is None:
            return np.zeros(0, np.int64)
        key = item_id.encode("utf-8")
        return np.sort(np.concatenate([s.images_of_item(key) for s in gen.shards]))

    def search_by_item(self, item_id: str, k: int = 10) -> list[Hit] | None:
        """Items similar to ``item_id`` (all its images as queries, best score per item);
        None if the item has no live image."""
        self._maybe_reload()
        image_ids = self.images_of_item(item_id)
        vectors = [v for v in (self.vector_of(int(i)) for i in image_ids) if v is not None]
        if not vectors:
            return None
        rows = self.search(np.stack(vectors), k=k, exclude_item_ids=[{item_id}] * len(vectors))
        best: dict[str, Hit] = {}
        for hits in rows:
            for hit in hits:
                if hit.item_id not in best or hit.score > best[hit.item_id].score:
                    best[hit.item_id] = hit
        return sorted(best.values(), key=lambda h: (-h.score, h.image_id))[:k]

    def search_ids(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Raw merged top-``k`` (scores, image ids) over all shards, no collapsing."""
        self._maybe_reload()
        gen = self._gen
        queries = self._prepare(vectors, k, gen)
        if gen is None or queries.shape[0] == 0:
            n = queries.shape[0]
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        scores, ids, _ = self._fan_out(gen, queries, k, with_items=False)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

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
        self._maybe_reload()
        gen = self._gen
        queries = self._prepare(vectors, k, gen)
        if exclude_item_ids is not None and len(exclude_item_ids) != queries.shape[0]:
            raise ValueError(
                f"exclude_item_ids has {len(exclude_item_ids)} sets for {queries.shape[0]} queries"
            )
        if gen is None or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])]
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
    def _prepare(vectors: np.ndarray, k: int, gen: _Generation | None) -> np.ndarray:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.array(vectors, dtype=np.float32, ndmin=2)  # a copy: normalised in place
        if gen is None or queries.shape[0] == 0:
            return queries
        if queries.ndim != 2 or queries.shape[1] != gen.info.dim:
            raise ValueError(f"queries must be (q, {gen.info.dim}), got {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("queries must be finite")
        faiss.normalize_L2(queries)
        return queries

    def _fan_out(
        self, gen: _Generation, queries: np.ndarray, fetch_k: int, *, with_items: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        shards = [s for s in gen.shards if s.index.ntotal > 0]
        if not shards:
            n = queries.shape[0]
            empty = np.zeros((n, 0))
            return empty.astype(np.float32), empty.astype(np.int64), None

        def finish(shard: _Shard, scores: np.ndarray, ids: np.ndarray) -> _Part:
            found = ids >= 0
            items = None
            if with_items:
                items = np.full(ids.shape, b"", dtype=shard.base.item_ids.dtype)
                items = items.astype(f"S{max(items.dtype.itemsize, 1)}")
                looked_up = shard.item_of(ids[found])
                if looked_up.dtype.itemsize > items.dtype.itemsize:
                    items = items.astype(looked_up.dtype)
                items[found] = looked_up
            return np.where(found, scores, -np.inf), ids, items

        groups: dict[tuple[str, int], list[int]] = {}
        whole: list[int] = []
        for pos, shard in enumerate(shards):
            if shard.coarse is None:
                whole.append(pos)
            else:
                ivf: Any = shard.index  # an IndexIVF: coarse is only set for those
                nprobe = int(ivf.nprobe)
                groups.setdefault((shard.coarse, nprobe), []).append(pos)

        parts: dict[int, _Part] = {}
        for (_, nprobe), members in groups.items():
            for pos, (scores, ids) in self._scan_shared(
                [shards[p] for p in members], members, queries, fetch_k, nprobe
            ).items():
                parts[pos] = finish(shards[pos], scores, ids)

        def one(pos: int) -> tuple[int, _Part]:
            scores, ids = shards[pos].index.search(queries, fetch_k)
            return pos, finish(shards[pos], scores, ids)

        if len(whole) > 1 and queries.shape[0] < _PARALLEL_SHARDS_BELOW_QUERIES:
            parts.update(self._pool.map(one, whole))
        else:
            parts.update(one(pos) for pos in whole)

        ordered = [parts[pos] for pos in range(len(shards))]
        scores = np.concatenate([p[0] for p in ordered], axis=1)
        ids = np.concatenate([p[1] for p in ordered], axis=1)
        items = (
            np.concatenate([p[2] for p in ordered if p[2] is not None], axis=1)
            if with_items
            else None
        )
        return scores, ids, items

    def _scan_shared(
        self,
        shards: list[_Shard],
        positions: list[int],
        queries: np.ndarray,
        fetch_k: int,
        nprobe: int,
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Assign each query to its lists once, then scan each shard's part of those lists.

        A batch is cut into one slice per worker; a worker assigns its slice (the coarse
        search is spread over the cores too) and scans every shard for it. A batch too
        small to cut is assigned here and its shards are scanned side by side.
        """
        quantizer = cast(Any, shards[0].index).quantizer
        n = queries.shape[0]
        out = {
            pos: (np.empty((n, fetch_k), np.float32), np.empty((n, fetch_k), np.int64))
            for pos in positions
        }

        def scan(shard_at: int, lo: int, hi: int, coarse: np.ndarray, lists: np.ndarray) -> None:
            shard = cast(Any, shards[shard_at].index)
            scores, ids = shard.search_preassigned(queries[lo:hi], fetch_k, lists, coarse)
            out[positions[shard_at]][0][lo:hi] = scores
            out[positions[shard_at]][1][lo:hi] = ids

        if n >= self._workers * _MIN_SLICE_QUERIES or len(shards) == 1:
            bounds = np.linspace(0, n, min(self._workers, n) + 1).astype(int)

            def one_slice(bound: tuple[int, int]) -> None:
                lo, hi = bound
                coarse, lists = quantizer.search(queries[lo:hi], nprobe)
                for shard_at in range(len(shards)):
                    scan(shard_at, lo, hi, coarse, lists)

            tasks = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds) if hi > lo]
            for _ in self._pool.map(one_slice, tasks):
                pass  # map re-raises a failed scan here
            return out

        coarse, lists = quantizer.search(queries, nprobe)
        for _ in self._pool.map(lambda at: scan(at, 0, n, coarse, lists), range(len(shards))):
            pass
        return out

    def _search_once(
        self,
        gen: _Generation,
        queries: np.ndarray,
        fetch_k: int,
        k: int,
        collapse_items: bool,
        exclude_item_ids: list[set[str]] | None,
    ) -> list[list[Hit]]:
        all_scores, all_ids, all_items = self._fan_out(gen, queries, fetch_k, with_items=True)
        assert all_items is not None or all_ids.shape[1] == 0
        results: list[list[Hit]] = []
        for row in range(queries.shape[0]):
            if all_items is None:
                results.append([])
                continue
            # Ties broken by image id so results are deterministic across shard layouts.
            order = np.lexsort((all_ids[row], -all_scores[row]))
            excluded = exclude_item_ids[row] if exclude_item_ids is not None else set()
            seen: set[str] = set()
            row_hits: list[Hit] = []
            for col in order:
                image_id = int(all_ids[row, col])
                if image_id < 0:
                    break  # -inf scores sort last: only padding from here on
                item_id = text(all_items[row, col])
                if item_id in excluded or (collapse_items and item_id in seen):
                    continue
                seen.add(item_id)
                row_hits.append(Hit(item_id, image_id, float(all_scores[row, col])))
                if len(row_hits) == k:
                    break
            results.append(row_hits)
        return results
