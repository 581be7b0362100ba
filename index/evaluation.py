"""Recall against exact search: the measure behind ``nprobe`` tuning and ``index eval``.

- ``exact_top``, ``merge_top``, ``without_self`` and ``recall_at_k`` are the pieces a
  build uses to tune ``nprobe`` on held-back queries (``index.shardset``): every shard's
  top-k merged as a searcher merges them, each query's own id left out of both answers.
- ``evaluate_generation`` measures a published generation end to end: the real
  ``Searcher`` (fan-out and merge included) against an exact scan of the shard tables.

Scores are inner products of unit vectors; ids ``-1`` pad answers shorter than ``k``.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from common.storage.base import Storage
from index.generations import GenerationError
from index.manifest import GenerationInfo
from index.routing import shards_for
from index.search import Searcher
from index.shardfiles import ShardRows, merge_rows, read_base, read_delta


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each exact top-``k`` found in the approximate top-``k``."""
    if approx.shape[0] == 0:
        return 1.0
    hits = 0.0
    for a, e in zip(approx[:, :k], exact[:, :k], strict=True):
        e_valid = e[e >= 0]
        hits += len(np.intersect1d(a[a >= 0], e_valid)) / max(len(e_valid), 1)
    return hits / approx.shape[0]


def exact_top(
    queries: np.ndarray, base: np.ndarray, base_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top-``k`` by inner product, padded with (-inf, -1)."""
    n_q = queries.shape[0]
    if base.shape[0] == 0:
        return np.full((n_q, k), -np.inf, np.float32), np.full((n_q, k), -1, np.int64)
    scores, rows = faiss.knn(
        queries, base, min(k, base.shape[0]), metric=faiss.METRIC_INNER_PRODUCT
    )
    ids = np.where(rows >= 0, base_ids[np.maximum(rows, 0)], -1)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, ids


def merge_top(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) into the overall top-``k`` (ties by image id)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.lexsort((ids, -scores), axis=1)[:, :k] if scores.shape[1] else None
    if order is None:
        return scores, ids
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def without_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Drop each query's own id (held-back queries are in the index too)."""
    out = np.full((ids.shape[0], k), -1, np.int64)
    for row in range(ids.shape[0]):
        kept = ids[row][ids[row] != self_ids[row]][:k]
        out[row, : kept.shape[0]] = kept
    return out


def evaluate_generation(
    storage: Storage,
    *,
    generation: int | None = None,
    k: int = 10,
    queries: int = 500,
    nprobe: int | None = None,
    seed: int = 7,
    block_rows: int = 262_144,
) -> dict[str, Any]:
    """recall@k of the whole generation (fan-out and merge included) against exact search.

    Queries are a sample of the generation's own live vectors; each query's own image is
    left out of both answers. Exact search runs block by block over the float16 vectors
    (memory-mapped), so memory stays at one block.
    """
    searcher = Searcher(storage, generation=generation, nprobe=nprobe)
    info = searcher.info
    if info is None:
        raise GenerationError("no index generation has been published yet")
    ids = searcher.image_ids()
    if ids.shape[0] < 2:
        return {"generation": info.generation, "recall_at_k": None, "k": k, "queries": 0}
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(ids, min(queries, ids.shape[0]), replace=False))
    tables = _shard_tables(storage, info)
    query_vectors = _vectors_of(tables, query_ids, info)

    started_s = time.perf_counter()
    exact = _exact_blockwise(tables, query_vectors, k + 1, block_rows)
    exact_s = time.perf_counter() - started_s
    started_s = time.perf_counter()
    _, approx = searcher.search_ids(query_vectors, k + 1)
    approx_s = time.perf_counter() - started_s

    recall = recall_at_k(without_self(approx, query_ids, k), without_self(exact, query_ids, k), k)
    return {
        "generation": info.generation,
        "k": k,
        "queries": int(query_ids.shape[0]),
        "recall_at_k": round(recall, 4),
        "exact_s": round(exact_s, 3),
        "approx_s": round(approx_s, 3),
        "vectors": int(ids.shape[0]),
        "shard_recall_at_10": [s.recall_at_10 for s in info.shards],
    }


def _shard_tables(storage: Storage, info: GenerationInfo) -> list[ShardRows]:
    """Every shard's rows (base + delta), vectors memory-mapped where storage is local."""
    tables = []
    for s in info.shards:
        rows = read_base(storage, s.items_key, s.vectors_key, info.dim, load_vectors=True)
        if s.delta_key:
            rows = merge_rows(rows, read_delta(storage, s.delta_key, info.dim))
        tables.append(rows)
    return tables


def _vectors_of(tables: list[ShardRows], image_ids: np.ndarray, info: GenerationInfo) -> np.ndarray:
    """The stored vectors of ``image_ids``, normalised float32 (the evaluation's queries)."""
    vectors = np.zeros((image_ids.shape[0], info.dim), np.float32)
    shard_of = shards_for(image_ids, info.n_shards)
    for row, (image_id, shard) in enumerate(zip(image_ids, shard_of, strict=True)):
        table = tables[int(shard)]
        vectors[row] = table.vectors[table.row_of(int(image_id))]
    faiss.normalize_L2(vectors)
    return vectors


def _exact_blockwise(
    tables: list[ShardRows], queries: np.ndarray, k: int, block_rows: int
) -> np.ndarray:
    """Ids of the exact top-``k`` over every live row, ``block_rows`` rows in memory at once."""
    best_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
    best_ids = np.full((queries.shape[0], k), -1, np.int64)
    for table in tables:
        live = np.nonzero(~table.tombstones)[0]
        for start in range(0, live.shape[0], block_rows):
            block_idx = live[start : start + block_rows]
            block = np.asarray(table.vectors[block_idx], np.float32)
            faiss.normalize_L2(block)
            scores, found = faiss.knn(
                queries, block, min(k, block_idx.shape[0]), metric=faiss.METRIC_INNER_PRODUCT
            )
            found_ids = table.image_ids[block_idx][found]
            all_scores = np.concatenate([best_scores, scores], axis=1)
            all_ids = np.concatenate([best_ids, found_ids], axis=1)
            order = np.argsort(-all_scores, axis=1)[:, :k]
            best_scores = np.take_along_axis(all_scores, order, 1)
            best_ids = np.take_along_axis(all_ids, order, 1)
    return best_ids
