"""Build the shards of one generation together: one shared IVF template, one nprobe.

Two passes, so memory holds one shard's float vectors at a time:

1. Each shard's rows are written as its tables (base table and float16 vectors) while a
   uniform sample of live vectors is drawn across all shards (priority sampling: each row
   gets a random key, the smallest keys are kept).
2. The shard parameters are chosen from the live counts; if any shard is IVF, one template
   (coarse quantizer and codec) is trained on the sample. Each shard is read back from its
   table (memory-mapped where local), its index filled from the template, and its exact
   top-k for the held-back queries computed.

Then ``nprobe`` is tuned once for the generation: the smallest candidate whose merged
recall@10 (every shard's top-k merged, as a searcher does) reaches the target on the
held-back queries, escalating SQ8 to SQfp16 when no nprobe can. The built indexes (codes,
what a searcher holds) stay in memory until then; their files are written last.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.errors import ExitCode, OperatorError
from common.observability.logging import get_logger
from common.observability.progress import Progress
from common.storage.base import Storage
from index.evaluation import exact_top, merge_top, recall_at_k, without_self
from index.faiss_io import index_bytes, set_nprobe
from index.manifest import ShardInfo, shard_index_key, shard_items_key, shard_vectors_key
from index.params import (
    ID_BYTES,
    IndexPolicy,
    choose_shard_params,
    code_bytes_per_vector,
    nprobe_candidates,
)
from index.shardfiles import ShardRows, encode_table, encode_vectors, read_base
from index.training import escalated_template, shard_index, train_template

_K = 10


class ShardSetError(OperatorError):
    """A shard set cannot be trained or written as configured."""

    exit_code = ExitCode.FAILED


def live_vectors(rows: ShardRows) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 vectors, ids) of the live rows."""
    live = ~rows.tombstones
    vectors = np.asarray(rows.vectors[live], dtype=np.float32)
    if vectors.shape[0]:
        # Scores are cosine similarities only if both sides are unit length; normalising
        # here protects the index from a worker that forgot to.
        faiss.normalize_L2(vectors)
    return vectors, rows.image_ids[live]


class _Sample:
    """A uniform sample without replacement of at most ``cap`` live vectors, across shards."""

    def __init__(self, cap: int, seed: int) -> None:
        self.cap = cap
        self.rng = np.random.default_rng(seed)
        self.keys = np.zeros(0, np.float64)
        self.vectors: np.ndarray | None = None
        self.ids = np.zeros(0, np.int64)

    def offer(self, rows: ShardRows) -> None:
        live = np.nonzero(~rows.tombstones)[0]
        if live.shape[0] == 0 or self.cap == 0:
            return
        keys = self.rng.random(live.shape[0])
        if self.keys.shape[0] >= self.cap:
            worst = self.keys.max()
            chosen = keys < worst
            live, keys = live[chosen], keys[chosen]
        vectors = np.asarray(rows.vectors[live], np.float16)
        all_keys = np.concatenate([self.keys, keys])
        all_vectors = vectors if self.vectors is None else np.concatenate([self.vectors, vectors])
        all_ids = np.concatenate([self.ids, rows.image_ids[live]])
        if all_keys.shape[0] > self.cap:
            kept = np.argpartition(all_keys, self.cap - 1)[: self.cap]
            all_keys, all_vectors, all_ids = all_keys[kept], all_vectors[kept], all_ids[kept]
        self.keys, self.vectors, self.ids = all_keys, all_vectors, all_ids

    def split(self, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query vectors, query ids, training vectors), normalised float32, disjoint when
        the sample is large enough for both."""
        if self.vectors is None:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        order = np.argsort(self.keys, kind="stable")
        vectors = np.asarray(self.vectors[order], np.float32)
        faiss.normalize_L2(vectors)
        ids = self.ids[order]
        n_queries = min(n_queries, vectors.shape[0])
        train = vectors[n_queries:] if vectors.shape[0] - n_queries >= n_queries else vectors
        return np.ascontiguousarray(vectors[:n_queries]), ids[:n_queries], train


@dataclass
class _Pending:
    """A shard whose tables are written and whose index is still to come."""

    shard: int
    revision: int
    tag: str
    items_key: str
    vectors_key: str
    base_rows: int
    live: int
    tombstones: int
    tables_s: float


@dataclass
class _Built:
    index: faiss.Index
    params: dict[str, Any]
    exact: tuple[np.ndarray, np.ndarray]
    add_s: float


@dataclass
class ShardSetResult:
    shards: list[ShardInfo]
    indexes: dict[int, faiss.Index]
    summary: dict[str, Any] = field(default_factory=dict)


class ShardSetBuilder:
    """``add_rows`` for every shard of a generation, then ``finish`` once."""

    def __init__(
        self,
        storage: Storage,
        generation: int,
        policy: IndexPolicy,
        *,
        log: Any = None,
        keep_indexes: bool = False,
    ) -> None:
        self.storage = storage
        self.generation = generation
        self.policy = policy
        self.log = log or get_logger("index.build")
        self.keep_indexes = keep_indexes
        self._pending: dict[int, _Pending] = {}
        self._sample = _Sample(policy.max_train_vectors + policy.eval_queries, policy.seed)
        self._dim: int | None = None

    def add_rows(self, shard: int, rows: ShardRows, *, revision: int = 0) -> None:
        """Write the shard's tables (never read by anyone before a manifest names them)."""
        if self._dim is not None and rows.dim != self._dim:
            raise ShardSetError(f"shard {shard} has dim {rows.dim}, others have {self._dim}")
        self._dim = rows.dim
        started_s = time.perf_counter()
        tag = "" if revision == 0 else secrets.token_hex(4)
        items_key = shard_items_key(self.generation, shard, revision, tag)
        vectors_key = shard_vectors_key(self.generation, shard, revision, tag)
        self.storage.put(vectors_key, encode_vectors(np.asarray(rows.vectors, np.float16)))
        self.storage.put(items_key, encode_table(rows, with_vectors=False))
        self._sample.offer(rows)
        self._pending[shard] = _Pending(
            shard=shard,
            revision=revision,
            tag=tag,
            items_key=items_key,
            vectors_key=vectors_key,
            base_rows=len(rows),
            live=rows.live_count,
            tombstones=int(rows.tombstones.sum()),
            tables_s=time.perf_counter() - started_s,
        )

    def finish(self, dim: int) -> ShardSetResult:
        """Train, fill, tune and write every shard's index; shard infos in shard order."""
        policy = self.policy
        shards = sorted(self._pending)
        counts = [self._pending[s].live for s in shards]
        all_params = dict(zip(shards, choose_shard_params(counts, dim, policy), strict=True))
        queries, query_ids, train = self._sample.split(policy.eval_queries)
        self._sample = _Sample(0, 0)  # free it: the build holds one shard from here on
        ivf_params = next((p for p in all_params.values() if p["kind"] == "ivf"), None)
        template: faiss.Index | None = None
        train_info: dict[str, Any] = {}
        if ivf_params is not None:
            n_train = min(
                train.shape[0],
                max(ivf_params["nlist"] * policy.train_per_list, ivf_params["nlist"] * 39),
                policy.max_train_vectors,
            )
            template, train_info = train_template(ivf_params, train[:n_train], policy)
            self.log.info(
                "template_trained",
                generation=self.generation,
                factory=ivf_params["factory"],
                **train_info,
            )
        with tempfile.TemporaryDirectory(prefix="imgfleet-build-") as cache:
            built = self._fill(shards, all_params, template, train_info, queries, dim, Path(cache))
            nprobe, merged, per_shard = self._tune(built, queries, query_ids, ivf_params)
            if (
                template is not None
                and ivf_params is not None
                and merged is not None
                and merged < policy.recall_target
                and not policy.nprobe
            ):
                largest = max(counts)  # every shard is IVF once one is
                escalated = escalated_template(template, ivf_params, train, largest, policy)
                if escalated is not None:
                    template, ivf_params = escalated
                    for shard in shards:
                        if all_params[shard]["kind"] == "ivf":
                            all_params[shard] = {
                                **all_params[shard],
                                **{
                                    k: ivf_params[k] for k in ("factory", "codes", "escalated_from")
                                },
                                "bytes": self._bytes(self._pending[shard].live, ivf_params, dim),
                            }
                    built = self._fill(
                        shards, all_params, template, train_info, queries, dim, Path(cache)
                    )
                    nprobe, merged, per_shard = self._tune(built, queries, query_ids, ivf_params)
        if merged is not None and merged < policy.recall_target:
            get_logger("index.params").warning(
                "recall target not met",
                recall=merged,
                target=policy.recall_target,
                factory=None if ivf_params is None else ivf_params["factory"],
                nprobe=nprobe,
            )
        return self._write(shards, built, nprobe, merged, per_shard, queries.shape[0], train_info)

    @staticmethod
    def _bytes(n: int, params: dict[str, Any], dim: int) -> int:
        return n * (code_bytes_per_vector(params, dim) + ID_BYTES) + int(params["nlist"]) * dim * 4

    def _fill(
        self,
        shards: list[int],
        all_params: dict[int, dict[str, Any]],
        template: faiss.Index | None,
        train_info: dict[str, Any],
        queries: np.ndarray,
        dim: int,
        cache: Path,
    ) -> dict[int, _Built]:
        progress = Progress(self.log, "shard indexes", len(shards))
        built: dict[int, _Built] = {}
        for shard in shards:
            pending = self._pending[shard]
            rows = read_base(
                self.storage,
                pending.items_key,
                pending.vectors_key,
                dim,
                load_vectors=True,
                cache_dir=cache,
            )
            vectors, ids = live_vectors(rows)
            del rows
            params = dict(all_params[shard])
            if params["kind"] == "ivf":
                params.update(train_info)
            index = shard_index(params, template, dim)
            started_s = time.perf_counter()
            if vectors.shape[0]:
                index.add_with_ids(vectors, ids)
            add_s = time.perf_counter() - started_s
            exact = (
                exact_top(queries, vectors, ids, _K + 1)
                if queries.shape[0]
                else (np.zeros((0, _K + 1), np.float32), np.zeros((0, _K + 1), np.int64))
            )
            built[shard] = _Built(index=index, params=params, exact=exact, add_s=add_s)
            progress.advance()
        return built

    def _tune(
        self,
        built: dict[int, _Built],
        queries: np.ndarray,
        query_ids: np.ndarray,
        ivf_params: dict[str, Any] | None,
    ) -> tuple[int | None, float | None, dict[int, float | None]]:
        """(nprobe, merged recall@10, per-shard recall@10) on the held-back queries."""
        if queries.shape[0] < 1:
            return (None if ivf_params is None else (self.policy.nprobe or 1)), None, {}
        exact = without_self(merge_top([b.exact for b in built.values()], _K + 1)[1], query_ids, _K)
        candidates = (
            [1] if ivf_params is None else nprobe_candidates(ivf_params["nlist"], self.policy)
        )
        nprobe, merged = candidates[0], 0.0
        answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for nprobe in candidates:
            answers = {}
            for shard, b in built.items():
                set_nprobe(b.index, nprobe)
                scores, ids = b.index.search(queries, _K + 1)
                answers[shard] = (np.where(ids >= 0, scores, -np.inf), ids)
            approx = without_self(merge_top(list(answers.values()), _K + 1)[1], query_ids, _K)
            merged = recall_at_k(approx, exact, _K)
            if merged >= self.policy.recall_target:
                break
        per_shard: dict[int, float | None] = {}
        for shard, b in built.items():
            if b.index.ntotal <= 1:
                per_shard[shard] = None
                continue
            own_exact = without_self(b.exact[1], query_ids, _K)
            own = without_self(answers[shard][1], query_ids, _K)
            per_shard[shard] = round(recall_at_k(own, own_exact, _K), 4)
        return (None if ivf_params is None else nprobe), round(merged, 4), per_shard

    def _write(
        self,
        shards: list[int],
        built: dict[int, _Built],
        nprobe: int | None,
        merged: float | None,
        per_shard: dict[int, float | None],
        n_queries: int,
        train_info: dict[str, Any],
    ) -> ShardSetResult:
        infos: list[ShardInfo] = []
        for shard in shards:
            pending, b = self._pending[shard], built[shard]
            started_s = time.perf_counter()
            index_key = shard_index_key(self.generation, shard, pending.revision, pending.tag)
            # Tables were written first: a reader that finds the index finds what it points into.
            self.storage.put(index_key, index_bytes(b.index))
            params = {**b.params, "add_s": round(b.add_s, 3)}
            if nprobe is not None and params["kind"] == "ivf":
                params["nprobe"] = nprobe
            recall = per_shard.get(shard)
            info = ShardInfo(
                shard=shard,
                revision=pending.revision,
                index_key=index_key,
                items_key=pending.items_key,
                vectors_key=pending.vectors_key,
                vectors=int(b.index.ntotal),
                tombstones=pending.tombstones,
                base_rows=pending.base_rows,
                params=params,
                recall_at_10=recall,
                eval_queries=n_queries if recall is not None else 0,
                build_s=round(pending.tables_s + b.add_s + time.perf_counter() - started_s, 3),
            )
            self.log.info(
                "shard_built",
                generation=self.generation,
                shard=shard,
                vectors=info.vectors,
                factory=params["factory"],
                nprobe=params.get("nprobe"),
                recall_at_10=info.recall_at_10,
                seconds=info.build_s,
            )
            infos.append(info)
        summary: dict[str, Any] = {
            "recall_at_10": merged,
            "eval_queries": n_queries,
            "nprobe": nprobe,
            "coarse_id": train_info.get("coarse_id"),
            "train_s": train_info.get("train_s"),
        }
        indexes = {s: built[s].index for s in shards} if self.keep_indexes else {}
        return ShardSetResult(shards=infos, indexes=indexes, summary=summary)
