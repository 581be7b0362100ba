"""Build a generation of FAISS shards from the vector segments and publish it.

Resolution per image id is a pure function of the ordered segment log: the highest
``version`` wins, and among equal versions the later record (later segment, later row)
wins; a winning tombstone deletes. Replaying a segment therefore changes nothing, and a
late, older upsert cannot undo a newer delete.

A generation is built either from every segment (``run_id=None``: a full replay), or from
a nightly run: the segments written since the run started, keeping the run's own records
and records outside any nightly run (CMS changes that arrived during the run). Images the
run did not mention are gone from the new generation, which is what a full catalogue run
means; the fetcher writes a record for every image of a run, reusing unchanged vectors.

Generation N+1 is built while N serves. Before it is published, segments that landed
during the build are applied to it (``index.apply``), so a CMS change made during the
rebuild is in N+1. The manifest is written last, by compare-and-swap; a crash anywhere
before leaves N serving and N+1's files unreferenced (the rerun reuses the number).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import OperatorError
from common.observability.logging import get_logger
from common.observability.progress import Progress
from common.storage.base import Storage
from index.manifest import (
    GenerationInfo,
    load_versioned,
    with_generation,
    write_manifest,
)
from index.params import METRIC, IndexPolicy
from index.routing import shards_for
from index.runs import RUNS_PREFIX, RunInfo, read_run
from index.segments import (
    SegmentData,
    list_segments,
    read_segment,
    segment_shard,
    segment_time_ns,
)
from index.shardfiles import ShardRows, empty_rows, make_rows
from index.shardset import ShardSetBuilder

# A segment becomes visible some time after the timestamp in its key (the flush's put,
# clock skew between hosts). Keys older than this at listing time are assumed complete.
DEFAULT_GRACE_S = 600.0


class IndexBuildError(OperatorError):
    """The segments cannot make a generation (no dim, several models, ...)."""


class ManifestConflictError(OperatorError):
    """Another writer moved the manifest on; the build may simply be run again."""


@dataclass(frozen=True)
class RecordFilter:
    """Which records of a segment take part: nightly runs other than ``run_id`` are left
    to the generation built from them."""

    nightly_runs: frozenset[str]
    run_id: str | None
    model_id: str | None = None  # live apply: vectors of another model cannot join

    def keep(self, segment: SegmentData) -> np.ndarray:
        keep = np.ones(len(segment), bool)
        foreign = [r for r in self.nightly_runs if r != self.run_id]
        if foreign:
            keep &= ~np.isin(segment.run_ids, np.array(foreign, dtype=np.str_))
        if self.model_id is not None:
            keep &= segment.tombstones | (segment.model_ids == self.model_id)
        return keep


def nightly_runs(storage: Storage) -> frozenset[str]:
    names = (k[len(RUNS_PREFIX) :] for k in storage.list(RUNS_PREFIX))
    return frozenset(
        n.removesuffix(".json")
        for n in names
        if n.endswith(".json") and not n.endswith(".final.json") and "/" not in n
    )


def resolve_rows(
    segments: Iterable[SegmentData], shard: int, n_shards: int, dim: int | None, keep: RecordFilter
) -> tuple[ShardRows, int | None, set[str]]:
    """Replay ``segments`` (in log order) into the shard's rows, tombstones included.

    Rows routed to other shards are skipped, which is what lets a generation use another
    shard count than the writers did. Returns (rows, dim, model ids of live rows).
    """
    parts: list[dict[str, np.ndarray]] = []
    for segment in segments:
        mask = (shards_for(segment.image_ids, n_shards) == shard) & keep.keep(segment)
        if not mask.any():
            continue
        if segment.dim:
            if dim is not None and segment.dim != dim:
                raise IndexBuildError(
                    f"segment {segment.key!r} has dim {segment.dim}, others have {dim}"
                )
            dim = segment.dim
        parts.append(
            {
                "image_ids": segment.image_ids[mask],
                "versions": segment.versions[mask],
                "tombstones": segment.tombstones[mask],
                "vectors": segment.vectors[mask],
                "item_ids": segment.item_ids[mask],
                "content_hashes": segment.content_hashes[mask],
                "etags": segment.etags[mask],
                "last_modifieds": segment.last_modifieds[mask],
                "run_ids": segment.run_ids[mask],
                "model_ids": segment.model_ids[mask],
            }
        )
    width = dim or 0
    if not parts:
        return empty_rows(width), dim, set()
    col = {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if name != "vectors"}
    # Tombstone-only segments have zero-width vector arrays; widen them to stack.
    vectors = np.concatenate(
        [
            p["vectors"]
            if p["vectors"].shape[1] == width
            else np.zeros((p["vectors"].shape[0], width), np.float16)
            for p in parts
        ]
    )
    log_position = np.arange(col["image_ids"].shape[0])
    order = np.lexsort((log_position, col["versions"], col["image_ids"]))
    sorted_ids = col["image_ids"][order]
    winners = order[np.append(sorted_ids[1:] != sorted_ids[:-1], True)]
    live = winners[~col["tombstones"][winners]]
    rows = make_rows(
        image_ids=col["image_ids"][winners],
        versions=col["versions"][winners],
        tombstones=col["tombstones"][winners],
        item_ids=col["item_ids"][winners],
        content_hashes=col["content_hashes"][winners],
        etags=col["etags"][winners],
        last_modifieds=col["last_modifieds"][winners],
        run_ids=col["run_ids"][winners],
        vectors=np.where(col["tombstones"][winners][:, None], np.float16(0), vectors[winners]),
    )
    return rows, dim, {str(m) for m in col["model_ids"][live]}


def _segments_for_shard(
    storage: Storage, keys: list[str], shard: int, n_shards: int, same_layout: bool
) -> Iterable[SegmentData]:
    for key in keys:
        if same_layout and segment_shard(key) != shard:
            continue
        yield read_segment(storage, key)


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


def build_generation(
    storage: Storage,
    n_shards: int,
    *,
    run_id: str | None = None,
    policy: IndexPolicy | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    catch_up: bool = True,
    log: Any = None,
) -> GenerationInfo:
    """Build every shard, apply what landed meanwhile, then publish as the next generation.

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
    keep = RecordFilter(nightly_runs=nightly_runs(storage) if run else frozenset(), run_id=run_id)
    same_layout = _layout_matches(storage, keys, n_shards)
    if not same_layout:
        log.info("resharding", n_shards=n_shards, segments=len(keys))
    log.info("build_started", generation=generation, run_id=run_id, segments=len(keys))

    dim: int | None = None
    model_ids: set[str] = set()
    builder = ShardSetBuilder(storage, generation, policy, log=log)
    waiting: dict[int, ShardRows] = {}  # shards met before any dim was known
    progress = Progress(log, "shard tables", n_shards)
    for shard in range(n_shards):
        segments = _segments_for_shard(storage, keys, shard, n_shards, same_layout)
        rows, dim, shard_models = resolve_rows(segments, shard, n_shards, dim, keep)
        model_ids |= shard_models
        if len(model_ids) > 1:
            raise IndexBuildError(f"live vectors come from several models: {sorted(model_ids)}")
        if dim is None:
            waiting[shard] = rows
            continue
        builder.add_rows(shard, rows)
        progress.advance()

    if dim is None and previous is not None:
        dim = previous.current().dim  # everything deleted: keep serving the same dim
    if dim is None:
        raise IndexBuildError(
            "cannot build a generation: no segment holds a vector, so the dim is unknown"
        )
    for shard, rows in waiting.items():
        if rows.dim != dim:
            rows = empty_rows(dim) if len(rows) == 0 else _widen(rows, dim)
        builder.add_rows(shard, rows)
    built = builder.finish(dim)

    through_ns = listing_ns - int(grace_s * 1e9)
    info = GenerationInfo(
        generation=generation,
        created_at_s=time.time(),
        updated_at_s=time.time(),
        n_shards=n_shards,
        dim=dim,
        model_id=next(iter(model_ids), None),
        run_id=run_id,
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
    if catch_up:
        from index.apply import Applier

        info = Applier(storage, policy=policy, grace_s=grace_s, log=log).catch_up(info)
    publish_generation(storage, info, log=log)
    return info


def _widen(rows: ShardRows, dim: int) -> ShardRows:
    from dataclasses import replace

    return replace(rows, vectors=np.zeros((len(rows), dim), np.float16))


def publish_generation(storage: Storage, info: GenerationInfo, *, log: Any = None) -> None:
    """Make ``info`` current with a compare-and-swap manifest write (retried on conflict).

    Only generations may be added here; a concurrent apply to the old generation changes
    another entry, so re-reading and re-adding is always safe.
    """
    log = log or get_logger("index.build")
    for _ in range(20):
        versioned = load_versioned(storage)
        manifest = with_generation(versioned.manifest, info)
        if write_manifest(storage, manifest, versioned.token):
            log.info(
                "generation_published",
                generation=info.generation,
                shards=info.n_shards,
                vectors=info.total_vectors,
                segments=info.segments_applied_count,
                run_id=info.run_id,
            )
            return
        time.sleep(0.05)
    raise ManifestConflictError("could not publish: the manifest kept changing under us")
