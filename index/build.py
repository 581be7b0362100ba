"""Build a generation of FAISS shards from the vector segments and publish it.

Resolution per image id is a pure function of the ordered segment log: the highest
``version`` wins, and among equal versions the later record (later segment, later row)
wins; a winning tombstone deletes. Replaying a segment therefore changes nothing, and a
late, older upsert cannot undo a newer delete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from common.errors import ImgfleetError, Reason
from common.logging import get_logger
from common.storage import Storage
from index.manifest import (
    GenerationInfo,
    load_manifest,
    shard_index_key,
    shard_items_key,
    with_generation,
    write_manifest,
)
from index.npz import pack_arrays
from index.routing import shards_for
from index.segments import SEGMENTS_PREFIX, list_segments, read_segment

INDEX_PARAMS: dict[str, Any] = {"factory": "IDMap2,Flat", "metric": "inner_product"}


class IndexBuildError(ImgfleetError):
    reason = Reason.INTERNAL


@dataclass(frozen=True)
class ResolvedShard:
    """The live images of one shard after resolution, sorted by image id."""

    image_ids: np.ndarray  # int64 [n]
    versions: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, d], L2-normalised
    item_ids: np.ndarray  # unicode [n]
    content_hashes: np.ndarray  # unicode [n]
    model_ids: set[str]

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


def resolve_shard(
    storage: Storage, shard: int, n_shards: int, segment_keys: list[str]
) -> tuple[ResolvedShard, int | None]:
    """Replay ``segment_keys`` (in order) into the live set; also return the vector dim."""
    segments = [read_segment(storage, key) for key in segment_keys]
    dims = {s.dim for s in segments if s.dim > 0}
    if len(dims) > 1:
        raise IndexBuildError(f"shard {shard} segments mix vector dims {sorted(dims)}")
    dim = dims.pop() if dims else None
    for segment in segments:
        misrouted = shards_for(segment.image_ids, n_shards) != shard
        if misrouted.any():
            raise IndexBuildError(
                f"segment {segment.key!r} holds ids of another shard for n_shards={n_shards}; "
                "it was written with a different shard count (resharding is not supported)"
            )
    width = dim or 0
    if not segments:
        return _empty_resolved(width), dim

    image_ids = np.concatenate([s.image_ids for s in segments])
    versions = np.concatenate([s.versions for s in segments])
    tombstones = np.concatenate([s.tombstones for s in segments])
    # Tombstone-only segments have zero-width vector arrays; widen them to stack.
    vectors = np.concatenate(
        [s.vectors if s.dim == width else np.zeros((len(s), width), np.float16) for s in segments]
    )
    item_ids = np.concatenate([s.item_ids for s in segments])
    content_hashes = np.concatenate([s.content_hashes for s in segments])
    model_ids = np.concatenate([s.model_ids for s in segments])

    # Log position is the final tie-break, so among equal versions the later record wins.
    log_position = np.arange(image_ids.shape[0])
    order = np.lexsort((log_position, versions, image_ids))
    sorted_ids = image_ids[order]
    is_last_of_id = np.append(sorted_ids[1:] != sorted_ids[:-1], True)
    winners = order[is_last_of_id]
    live = winners[~tombstones[winners]]

    live_vectors = vectors[live].astype(np.float32)
    if live_vectors.shape[0]:
        # Scores are cosine similarities only if both sides are unit length; normalising
        # here protects the index from a worker that forgot to.
        faiss.normalize_L2(live_vectors)
    resolved = ResolvedShard(
        image_ids=image_ids[live],
        versions=versions[live],
        vectors=live_vectors,
        item_ids=item_ids[live],
        content_hashes=content_hashes[live],
        model_ids={str(m) for m in model_ids[live]},
    )
    return resolved, dim


def _empty_resolved(dim: int) -> ResolvedShard:
    return ResolvedShard(
        image_ids=np.zeros(0, np.int64),
        versions=np.zeros(0, np.int64),
        vectors=np.zeros((0, dim), np.float32),
        item_ids=np.zeros(0, np.str_),
        content_hashes=np.zeros(0, np.str_),
        model_ids=set(),
    )


def serialize_shard(resolved: ResolvedShard, dim: int) -> tuple[bytes, bytes]:
    """(FAISS index bytes, items sidecar bytes) for one shard."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(resolved):
        index.add_with_ids(resolved.vectors.reshape(-1, dim), resolved.image_ids)
    index_bytes = faiss.serialize_index(index).tobytes()
    items_bytes = pack_arrays(
        {
            "image_id": resolved.image_ids,
            "item_id": resolved.item_ids,
            "version": resolved.versions,
            "content_hash": resolved.content_hashes,
        }
    )
    return index_bytes, items_bytes


def _shard_of_key(key: str) -> int:
    directory = key[len(SEGMENTS_PREFIX) :].split("/", 1)[0]
    return int(directory.removeprefix("shard-"))


def _check_no_foreign_shards(segment_keys: list[str], n_shards: int) -> None:
    known = {f"{SEGMENTS_PREFIX}shard-{k:04d}/" for k in range(n_shards)}
    foreign = [k for k in segment_keys if k[: k.rfind("/") + 1] not in known]
    if foreign:
        raise IndexBuildError(
            f"{len(foreign)} segments lie outside shards 0..{n_shards - 1} "
            f"(first: {foreign[0]!r}); they were written with a different shard count"
        )


def build_generation(storage: Storage, n_shards: int, *, log: Any = None) -> GenerationInfo:
    """Build every shard from all segments, then publish it as the next generation.

    Shards are built one at a time so memory holds one shard's segments, not the catalogue.
    The manifest is written last; a failure anywhere before it leaves the previous
    generation live and this generation's partial files unreferenced (the next build
    reuses the number and overwrites them).
    """
    log = log or get_logger("index.build")
    previous = load_manifest(storage)
    generation = 1 if previous is None else previous.current_generation + 1
    # One listing, taken up front: segments that land during the build are left for the
    # next build or apply, and ``segments_applied`` names exactly what this one replayed.
    all_keys = list_segments(storage)
    _check_no_foreign_shards(all_keys, n_shards)
    keys_by_shard: dict[int, list[str]] = {k: [] for k in range(n_shards)}
    for key in all_keys:
        keys_by_shard[_shard_of_key(key)].append(key)

    dim: int | None = None
    model_ids: set[str] = set()
    vector_counts: list[int] = []
    empty_shards: list[int] = []
    for shard in range(n_shards):
        started_s = time.perf_counter()
        resolved, shard_dim = resolve_shard(storage, shard, n_shards, keys_by_shard[shard])
        if shard_dim is not None:
            if dim is not None and shard_dim != dim:
                raise IndexBuildError(f"shard {shard} has dim {shard_dim}, others have {dim}")
            dim = shard_dim
        model_ids |= resolved.model_ids
        vector_counts.append(len(resolved))
        if dim is None:
            # Nothing has told us the dim yet; an empty shard is written once one has.
            empty_shards.append(shard)
            continue
        _write_shard(storage, generation, shard, resolved, dim)
        log.info(
            "shard_built",
            generation=generation,
            shard=shard,
            vectors=len(resolved),
            seconds=round(time.perf_counter() - started_s, 3),
        )

    if dim is None and previous is not None:
        dim = previous.current().dim  # everything deleted: keep serving the same dim
    if dim is None:
        raise IndexBuildError(
            "cannot build a generation: no segment holds a vector, so the dim is unknown"
        )
    for shard in empty_shards:
        _write_shard(storage, generation, shard, _empty_resolved(dim), dim)
        log.info("shard_built", generation=generation, shard=shard, vectors=0, seconds=0.0)
    if len(model_ids) > 1:
        raise IndexBuildError(f"live vectors come from several models: {sorted(model_ids)}")

    info = GenerationInfo(
        generation=generation,
        created_at_s=time.time(),
        n_shards=n_shards,
        dim=dim,
        model_id=next(iter(model_ids), None),
        shard_keys=[shard_index_key(generation, k) for k in range(n_shards)],
        item_keys=[shard_items_key(generation, k) for k in range(n_shards)],
        vector_counts=vector_counts,
        segments_applied=all_keys,
        index_params=INDEX_PARAMS,
    )
    write_manifest(storage, with_generation(previous, info))
    log.info(
        "generation_published",
        generation=generation,
        shards=n_shards,
        vectors=info.total_vectors,
        segments=len(all_keys),
    )
    return info


def _write_shard(
    storage: Storage, generation: int, shard: int, resolved: ResolvedShard, dim: int
) -> None:
    index_bytes, items_bytes = serialize_shard(resolved, dim)
    storage.put(shard_items_key(generation, shard), items_bytes)
    storage.put(shard_index_key(generation, shard), index_bytes)
