"""Build the next generation of FAISS shards from the vector segments (unpublished).

Each record is resolved as ``index.records`` describes (highest version wins; a later
record wins a tie; a winning tombstone deletes), so replaying a segment changes nothing.

A generation is built either from every segment (``run_id=None``: a full replay), or from
a nightly run: the segments written since the run started, keeping the run's own records
and records outside any nightly run (CMS changes that arrived during the run). Images the
run did not mention are gone from the new generation, which is what a full catalogue run
means; the fetcher writes a record for every image of a run, reusing unchanged vectors.

Generation N+1 is built while N serves. ``build_unpublished`` writes its files and returns
its ``GenerationInfo`` without publishing it: catching up with the segments that landed
during the build and the compare-and-swap publish are ``index.publish``. Files of a build
that never publishes are unreferenced (the rerun reuses the number; prune removes them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from common.observability.logging import get_logger
from common.observability.progress import Progress
from common.storage.base import Storage
from index.generations import build_state
from index.manifest import GenerationInfo, load_versioned
from index.params import METRIC, IndexPolicy
from index.records import DEFAULT_GRACE_S, IndexBuildError, RecordFilter, resolve_rows
from index.routing import shards_for
from index.runs import RunInfo, nightly_runs, read_run
from index.segments import (
    SegmentData,
    list_segments,
    read_segment,
    segment_shard,
    segment_time_ns,
)
from index.shardfiles import ShardRows, empty_rows
from index.shardset import ShardSetBuilder


def _segments_for_shard(
    storage: Storage, keys: list[str], shard: int, n_shards: int, same_layout: bool
) -> Iterable[SegmentData]:
    for key in keys:
        if same_layout and segment_shard(key) != shard:
            continue
        yield read_segment(storage, key)


def _run_model(storage: Storage, keys: list[str], run_id: str) -> str | None:
    """The model that embedded ``run_id``'s images: that of its first upsert in the log."""
    for key in keys:
        segment = read_segment(storage, key)
        mine = (segment.run_ids == run_id) & ~segment.tombstones
        if mine.any():
            return str(segment.model_ids[np.flatnonzero(mine)[0]])
    return None


def _layout_matches(storage: Storage, keys: list[str], n_shards: int) -> bool:
    """Whether the writers used ``n_shards``: then shard k needs only directory k.

    Checked on the first segment of every directory: directory numbers beyond the shard
    count, or a row routed elsewhere, mean another shard count (a full scan per shard).
    """
    first_of_dir: dict[int, str] = {}
    for key in keys:
        first_of_dir.setdefault(segment_shard(key), key)
    for directory, key in first_of_dir.items():
        if directory >= n_shards:
            return False
        segment = read_segment(storage, key)
        if (shards_for(segment.image_ids, n_shards) != directory).any():
            return False
    return True


def build_unpublished(
    storage: Storage,
    n_shards: int,
    *,
    run_id: str | None = None,
    policy: IndexPolicy | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    log: Any = None,
) -> GenerationInfo:
    """Build every shard of the next generation; its info, not yet published.

    Shards are read one at a time, so memory holds one shard's vectors, not the catalogue's
    (plus the generation's IVF codes while ``nprobe`` is tuned, see ``index.shardset``).
    """
    policy = policy or IndexPolicy()
    log = log or get_logger("index.build")
    previous = load_versioned(storage).manifest
    generation = 1 if previous is None else previous.latest_generation + 1
    run: RunInfo | None = read_run(storage, run_id) if run_id is not None else None
    listing_ns = time.time_ns()
    all_keys = list_segments(storage)
    keys = (
        all_keys
        if run is None
        else [k for k in all_keys if segment_time_ns(k) >= run.earliest_segment_ns]
    )
    # A run's generation holds the run's model alone: after a model switch the run
    # re-embedded the catalogue, and vectors of the old model (segments of workers not yet
    # switched, say) stay out instead of mixing two vector spaces.
    run_model = _run_model(storage, keys, run_id) if run_id is not None else None
    keep = RecordFilter(
        nightly_runs=nightly_runs(storage) if run else frozenset(),
        run_id=run_id,
        model_id=run_model,
    )
    same_layout = _layout_matches(storage, keys, n_shards)
    if not same_layout:
        log.info("resharding", n_shards=n_shards, segments=len(keys))
    log.info(
        "build_started",
        generation=generation,
        run_id=run_id,
        model_id=run_model,
        segments=len(keys),
    )

    builder = ShardSetBuilder(storage, generation, policy, log=log)
    # Everything deleted: keep serving the same dim.
    fallback_dim = None if previous is None else previous.current().dim
    dim, model_ids = _add_shards(
        storage, builder, keys, n_shards, same_layout, keep, fallback_dim, log
    )
    built = builder.finish(dim)

    through_ns = listing_ns - int(grace_s * 1e9)
    state = build_state(storage, run)
    return GenerationInfo(
        generation=generation,
        created_at_s=time.time(),
        updated_at_s=time.time(),
        n_shards=n_shards,
        dim=dim,
        model_id=next(iter(model_ids), None),
        run_id=run_id,
        catalogue=state.catalogue,
        catalogue_as_of_s=state.as_of_s,
        shards=built.shards,
        applied_through_ns=max(through_ns, 0),
        applied_after=[k for k in keys if segment_time_ns(k) > through_ns],
        segments_applied_count=len(keys),
        index_params={
            "metric": METRIC,
            "policy": policy.as_dict(),
            "grace_s": grace_s,
            **built.summary,
        },
    )


def _add_shards(
    storage: Storage,
    builder: ShardSetBuilder,
    keys: list[str],
    n_shards: int,
    same_layout: bool,
    keep: RecordFilter,
    fallback_dim: int | None,
    log: Any,
) -> tuple[int, set[str]]:
    """Resolve every shard's rows into ``builder``; (dim, model ids of the live vectors)."""
    dim: int | None = None
    model_ids: set[str] = set()
    waiting: dict[int, ShardRows] = {}  # shards met before any dim was known
    progress = Progress(log, "shard tables", n_shards)
    for shard in range(n_shards):
        segments = _segments_for_shard(storage, keys, shard, n_shards, same_layout)
        rows, dim, shard_models = resolve_rows(segments, shard, n_shards, dim, keep)
        model_ids |= shard_models
        if len(model_ids) > 1:
            raise IndexBuildError(
                f"live vectors come from several models: {sorted(model_ids)}; after a model "
                "switch, a nightly run re-embeds the catalogue (imgfleet produce catalogue) "
                "and its generation holds the new model alone"
            )
        if dim is None:
            waiting[shard] = rows
            continue
        builder.add_rows(shard, rows)
        progress.advance()

    dim = fallback_dim if dim is None else dim
    if dim is None:
        raise IndexBuildError(
            "cannot build a generation: no segment holds a vector, so the dim is unknown"
        )
    for shard, rows in waiting.items():
        if rows.dim != dim:
            rows = empty_rows(dim) if len(rows) == 0 else _widen(rows, dim)
        builder.add_rows(shard, rows)
    return dim, model_ids


def _widen(rows: ShardRows, dim: int) -> ShardRows:
    return replace(rows, vectors=np.zeros((len(rows), dim), np.float16))
