"""Live apply: new segments become upserts and deletes on the serving generation.

Each cycle lists the segments the generation has not applied, resolves them (newest
version wins; an equal version from later in the log wins, as in a build), and compares
each winner against the shard's current row for that id: an older version arriving late
is dropped, a newer one is removed from the FAISS index and added again (or only
removed, for a delete). The changed shards are checkpointed as a new revision (FAISS
file + delta table, or a compacted base), and the manifest that names them and records
the applied segments is written by compare-and-swap. A crash anywhere before that write
leaves the previous revision serving and the segments pending, so the rerun applies them
once; files of the dead attempt carry their own random tag and are removed by prune.

Records of a nightly run other than the generation's own are not applied live: the run
builds its own generation. Vectors of another model are skipped (they need a new
generation); their count is reported. After a rollback this is what keeps the rollback:
the generation served again gets every CMS change it has not applied (those made while
the newer generation served included, so none is lost), and none of the newer run's
records (its deletes and bumps stay undone, as ``index rollback`` warned); the runs
skipped are named in the report.

Compaction: when a shard's delta table passes ``compact_delta_fraction`` of its base, the
two are merged into a new base. Retraining is per generation, because the IVF shards of a
generation share one coarse quantizer (``index.training``): when live adds and removes since
training, summed over the shards, pass ``retrain_fraction`` of the generation's vectors,
every shard is rebuilt from its rows (base + delta) with a freshly trained shared template
and a re-tuned nprobe, as new revisions published by the same manifest write. Hash routing
spreads changes evenly, so shards would cross a per-shard threshold together anyway.
Adds between retrains go through each shard's copy of the shared quantizer, so they land
in the same lists in every shard.

Loaded shards are kept between cycles in the revision-aware cache of ``index.reader``;
a shard leaves it while a cycle changes it and returns once that change is published.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import faiss
import numpy as np

from common.observability.health import Health
from common.observability.logging import get_logger
from common.observability.metrics import Metrics, default_metrics
from common.storage.base import Storage
from index.faiss_io import index_bytes
from index.manifest import (
    CAS_ATTEMPTS,
    CAS_RETRY_S,
    GenerationInfo,
    ManifestConflictError,
    ShardInfo,
    load_versioned,
    shard_delta_key,
    shard_index_key,
    shard_items_key,
    shard_vectors_key,
    with_updated_generation,
    write_manifest,
)
from index.params import IndexPolicy
from index.reader import ShardCache, ShardTables, open_index, read_tables
from index.records import DEFAULT_GRACE_S, IndexBuildError, RecordFilter, resolve_rows
from index.routing import shards_for
from index.runs import nightly_runs
from index.segments import SegmentData, list_segments, read_segment, segment_time_ns
from index.shardfiles import (
    ShardRows,
    empty_rows,
    encode_table,
    encode_vectors,
    merge_rows,
    read_base,
)
from index.shardset import ShardSetBuilder, live_vectors


@dataclass
class ApplyReport:
    generation: int | None = None
    segments: int = 0
    upserts: int = 0
    deletes: int = 0
    stale: int = 0  # older than what the shard holds: dropped
    other_run: int = 0  # records of another nightly run
    other_runs: list[str] = field(default_factory=list)  # which runs
    other_model: int = 0
    shards: list[int] = field(default_factory=list)
    compacted: list[int] = field(default_factory=list)
    retrained: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _ShardState(ShardTables):
    """A shard as live apply holds it: its index (changed in place) and its full rows."""

    index: faiss.Index


def _load_state(storage: Storage, gen: GenerationInfo, info: ShardInfo) -> _ShardState:
    tables = read_tables(storage, gen, info, vectors=True)
    index = open_index(storage, info)
    return _ShardState(info=info, base=tables.base, delta=tables.delta, index=index)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    if ids.shape[0] == 0 or index.ntotal == 0:
        return 0
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if isinstance(index, faiss.IndexIVF):
        # The hash-table direct map removes by looking each id up: it takes an id array
        # (IDSelectorBatch would make it scan every inverted list).
        selector: Any = faiss.IDSelectorArray(ids.shape[0], faiss.swig_ptr(ids))
    else:
        selector = faiss.IDSelectorBatch(ids.shape[0], faiss.swig_ptr(ids))
    return int(index.remove_ids(selector))


class Applier:
    """Applies pending segments; keeps loaded shards between cycles of a long-running loop."""

    def __init__(
        self,
        storage: Storage,
        *,
        policy: IndexPolicy | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        compact_delta_fraction: float = 0.2,
        compact_min_rows: int = 10_000,
        retrain_fraction: float = 0.5,
        max_segments: int = 5_000,
        log: Any = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.storage = storage
        self.policy = policy or IndexPolicy()
        self.grace_s = grace_s
        self.compact_delta_fraction = compact_delta_fraction
        self.compact_min_rows = compact_min_rows
        self.retrain_fraction = retrain_fraction
        self.max_segments = max_segments
        self.log = log or get_logger("index.apply")
        self.metrics = metrics or default_metrics()
        self.health = health
        self._cache: ShardCache[_ShardState] = ShardCache(partial(_load_state, storage))

    # --- public ---------------------------------------------------------------------

    def apply_once(self) -> ApplyReport:
        """Apply the current generation's pending segments and publish; retried on conflict."""
        try:
            report = self._apply_once()
        except Exception:
            self.metrics.index_apply_cycles.labels(outcome="error").inc()
            if self.health is not None:
                self.health.set_ready("apply", False)
            raise
        self.metrics.index_apply_cycles.labels(outcome="ok").inc()
        self.metrics.index_apply_last_success.set(time.time())
        if self.health is not None:
            self.health.set_ready("apply", True)
        return report

    def _published(self, gen: GenerationInfo, applied: list[str], report: ApplyReport) -> None:
        """Gauges after a cycle: the generation, its shards, how long the changes waited."""
        m = self.metrics
        m.set_index_shards(gen.generation, {s.shard: s.vectors for s in gen.shards})
        if applied:
            oldest_ns = min(segment_time_ns(key) for key in applied)
            m.live_apply_delay.set(max(time.time_ns() - oldest_ns, 0) / 1e9)
        else:
            m.live_apply_delay.set(0)
        m.index_applied_records.labels(op="upsert").inc(report.upserts)
        m.index_applied_records.labels(op="delete").inc(report.deletes)

    def _apply_once(self) -> ApplyReport:
        started_s = time.perf_counter()
        for _ in range(CAS_ATTEMPTS):
            versioned = load_versioned(self.storage)
            if versioned.manifest is None:
                return ApplyReport()
            gen = versioned.manifest.current()
            # Shards of generations no longer served (a new build, a rollback) would stay
            # loaded for the life of the loop otherwise.
            self._cache.retain(gen)
            listing_ns = time.time_ns()
            pending = gen.pending(list_segments(self.storage))
            report = ApplyReport(generation=gen.generation)
            if not pending:
                self._published(gen, [], report)
                return report
            new_gen, report = self._apply(gen, pending, listing_ns)
            updated = with_updated_generation(versioned.manifest, new_gen)
            if write_manifest(self.storage, updated, versioned.token):
                report.seconds = time.perf_counter() - started_s
                self._published(new_gen, pending[: self.max_segments], report)
                self.log.info("segments_applied", **report.as_dict())
                return report
            # Someone else published first: what we changed in memory was not published.
            self._cache.forget(gen.generation)
            self.log.info("manifest_conflict_retry", generation=gen.generation)
            time.sleep(CAS_RETRY_S)
        raise ManifestConflictError("could not apply: the manifest kept changing under us")

    def catch_up(self, info: GenerationInfo, rounds: int = 3) -> GenerationInfo:
        """Apply pending segments to an unpublished generation (a build about to publish)."""
        for _ in range(rounds):
            listing_ns = time.time_ns()
            pending = info.pending(list_segments(self.storage))
            if not pending:
                break
            info, report = self._apply(info, pending, listing_ns)
            self.log.info("caught_up", **report.as_dict())
        self._cache.forget(info.generation)
        return info

    def watch(self, interval_s: float, stop: threading.Event | None = None) -> None:
        """Apply every ``interval_s`` until ``stop`` is set; errors are logged and retried."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.apply_once()
            except Exception as exc:  # one bad cycle must not end the loop
                self.log.error("apply_failed", error=str(exc), error_type=type(exc).__name__)
                self._cache.clear()
            stop.wait(interval_s)

    # --- one cycle ------------------------------------------------------------------

    def _apply(
        self, gen: GenerationInfo, pending: list[str], listing_ns: int
    ) -> tuple[GenerationInfo, ApplyReport]:
        truncated = len(pending) > self.max_segments
        pending = pending[: self.max_segments]
        report = ApplyReport(generation=gen.generation, segments=len(pending))
        segments = [read_segment(self.storage, key) for key in pending]
        runs = nightly_runs(self.storage)
        keep = RecordFilter(nightly_runs=runs, run_id=gen.run_id, model_id=gen.model_id)
        self._count_skipped(segments, keep, runs, gen, report)

        touched: set[int] = set()
        for segment in segments:
            mask = keep.keep(segment)
            routed = shards_for(segment.image_ids[mask], gen.n_shards)
            touched.update(int(s) for s in np.unique(routed))
        shards = list(gen.shards)
        # States leave the cache while they change; only a published cycle puts them back.
        states: dict[int, _ShardState] = {}
        changed: dict[int, bool] = {}
        index_params = gen.index_params
        try:
            for shard in sorted(touched):
                batch, dim, _ = resolve_rows(segments, shard, gen.n_shards, gen.dim, keep)
                if dim is not None and dim != gen.dim:
                    raise IndexBuildError(f"segments have dim {dim}, generation has {gen.dim}")
                states[shard], changed[shard] = self._apply_shard(
                    self._cache.take(gen, shard), batch, report
                )
            if self._retrain_due(gen, states):
                states, summary = self._retrain(gen, states)
                index_params = {**gen.index_params, **summary}
                report.retrained = sorted(states)
            else:
                for shard in [s for s in states if changed[s]]:
                    states[shard] = self._checkpoint(gen, states[shard], report)
            for shard, state in states.items():
                shards[shard] = state.info
        except BaseException:
            self._cache.forget(gen.generation)
            raise
        for state in states.values():
            self._cache.put(gen.generation, state)

        through_ns = gen.applied_through_ns
        if not truncated:
            through_ns = max(through_ns, listing_ns - int(self.grace_s * 1e9))
        after = [k for k in [*gen.applied_after, *pending] if segment_time_ns(k) > through_ns]
        new_gen = gen.model_copy(
            update={
                "shards": shards,
                "index_params": index_params,
                "applied_through_ns": through_ns,
                "applied_after": after,
                "segments_applied_count": gen.segments_applied_count + len(pending),
                "updated_at_s": time.time(),
            }
        )
        report.shards = sorted(touched)
        return new_gen, report

    @staticmethod
    def _count_skipped(
        segments: list[SegmentData],
        keep: RecordFilter,
        runs: frozenset[str],
        gen: GenerationInfo,
        report: ApplyReport,
    ) -> None:
        foreign = np.array([r for r in runs if r != gen.run_id] or [""], dtype=np.str_)
        other_runs: set[str] = set()
        for segment in segments:
            other_run = np.isin(segment.run_ids, foreign) & (segment.run_ids != "")
            report.other_run += int(other_run.sum())
            other_runs.update(str(r) for r in np.unique(segment.run_ids[other_run]))
            if gen.model_id is not None:
                other_model = ~segment.tombstones & (segment.model_ids != gen.model_id)
                report.other_model += int((other_model & ~other_run).sum())
        report.other_runs = sorted(other_runs)
        if report.other_model:
            get_logger("index.apply").warning(
                "vectors of another model skipped; build a new generation for them",
                count=report.other_model,
                generation=gen.generation,
                model_id=gen.model_id,
            )

    def _apply_shard(
        self, state: _ShardState, batch: ShardRows, report: ApplyReport
    ) -> tuple[_ShardState, bool]:
        """Remove + add the accepted records in memory; (state, whether anything changed)."""
        info = state.info
        # The shard's current version of each id: its delta row, else its base row.
        current_versions = np.full(len(batch), -1, np.int64)
        for rows in (state.base, state.delta):
            pos, found = rows.find(batch.image_ids)
            current_versions[found] = rows.versions[pos[found]]
        # Equal versions: the later record wins, as in a build (a replay is a no-op).
        accepted = batch.take(np.nonzero(batch.versions >= current_versions)[0])
        report.stale += len(batch) - len(accepted)
        if len(accepted) == 0:
            return state, False

        removed = remove_ids(state.index, accepted.image_ids)
        vectors, ids = live_vectors(accepted)
        if ids.shape[0]:
            state.index.add_with_ids(vectors, ids)
        report.upserts += int(ids.shape[0])
        report.deletes += int(accepted.tombstones.sum())
        new_info = info.model_copy(
            update={
                "vectors": int(state.index.ntotal),
                "changed_since_train": info.changed_since_train + removed + int(ids.shape[0]),
            }
        )
        return replace(state, info=new_info, delta=merge_rows(state.delta, accepted)), True

    def _retrain_due(self, gen: GenerationInfo, states: dict[int, _ShardState]) -> bool:
        infos = [states[s.shard].info if s.shard in states else s for s in gen.shards]
        changed = sum(i.changed_since_train for i in infos)
        vectors = sum(i.vectors for i in infos)
        return changed > self.retrain_fraction * max(vectors, self.compact_min_rows)

    def _retrain(
        self, gen: GenerationInfo, states: dict[int, _ShardState]
    ) -> tuple[dict[int, _ShardState], dict[str, Any]]:
        """Rebuild every shard of ``gen`` from its rows with a new shared template."""
        builder = ShardSetBuilder(
            self.storage, gen.generation, self.policy, log=self.log, keep_indexes=True
        )
        for shard_info in gen.shards:
            state = states.get(shard_info.shard) or self._cache.take(gen, shard_info.shard)
            builder.add_rows(
                shard_info.shard,
                merge_rows(state.base, state.delta),
                revision=state.info.revision + 1,
            )
        result = builder.finish(gen.dim)
        retrained: dict[int, _ShardState] = {}
        for info in result.shards:
            base = read_base(
                self.storage, info.items_key, info.vectors_key, gen.dim, load_vectors=True
            )
            retrained[info.shard] = _ShardState(
                info=info, index=result.indexes[info.shard], base=base, delta=empty_rows(gen.dim)
            )
        self.log.info(
            "generation_retrained",
            generation=gen.generation,
            shards=len(retrained),
            **{k: v for k, v in result.summary.items() if k != "eval_queries"},
        )
        return retrained, result.summary

    def _checkpoint(
        self, gen: GenerationInfo, state: _ShardState, report: ApplyReport
    ) -> _ShardState:
        """Write the shard's new revision: FAISS file + delta table, or a compacted base."""
        info, delta = state.info, state.delta
        revision = info.revision + 1
        tag = secrets.token_hex(4)
        index_key = shard_index_key(gen.generation, info.shard, revision, tag)

        if len(delta) > self.compact_delta_fraction * max(len(state.base), self.compact_min_rows):
            rows = merge_rows(state.base, delta)
            base_info = self._write_base(gen, info.shard, rows, revision, tag)
            self.storage.put(index_key, index_bytes(state.index))
            new_info = info.model_copy(
                update={
                    **base_info,
                    "revision": revision,
                    "index_key": index_key,
                    "delta_key": None,
                    "delta_rows": 0,
                    "tombstones": int(rows.tombstones.sum()),
                }
            )
            report.compacted.append(info.shard)
            base = read_base(
                self.storage, new_info.items_key, new_info.vectors_key, gen.dim, load_vectors=True
            )
            return _ShardState(
                info=new_info, index=state.index, base=base, delta=empty_rows(gen.dim)
            )

        delta_key = shard_delta_key(gen.generation, info.shard, revision, tag)
        self.storage.put(delta_key, encode_table(delta, with_vectors=True))
        self.storage.put(index_key, index_bytes(state.index))
        pos, found = state.base.find(delta.image_ids)
        base_tombstones_hidden = int(state.base.tombstones[pos[found]].sum())
        new_info = info.model_copy(
            update={
                "revision": revision,
                "index_key": index_key,
                "delta_key": delta_key,
                "delta_rows": len(delta),
                "tombstones": int(state.base.tombstones.sum())
                - base_tombstones_hidden
                + int(delta.tombstones.sum()),
            }
        )
        return replace(state, info=new_info)

    def _write_base(
        self, gen: GenerationInfo, shard: int, rows: ShardRows, revision: int, tag: str
    ) -> dict[str, Any]:
        items_key = shard_items_key(gen.generation, shard, revision, tag)
        vectors_key = shard_vectors_key(gen.generation, shard, revision, tag)
        self.storage.put(vectors_key, encode_vectors(np.asarray(rows.vectors, np.float16)))
        self.storage.put(items_key, encode_table(rows, with_vectors=False))
        return {"items_key": items_key, "vectors_key": vectors_key, "base_rows": len(rows)}
