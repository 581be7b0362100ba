"""Record resolution: which record of each image a generation holds, shared by build and apply.

Resolution per image id is a pure function of the ordered segment log: the highest
``version`` wins, and among equal versions the later record (later segment, later row)
wins; a winning tombstone deletes. Replaying a segment therefore changes nothing, and a
late, older upsert cannot undo a newer delete.

Which records take part is a ``RecordFilter``: records of a nightly run other than the
generation's own are left to the generation built from that run, and live apply skips
vectors of another model (they need a new generation).

Pure over decoded segments: no storage, no FAISS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from common.errors import ExitCode, OperatorError
from index.routing import shards_for
from index.segments import SegmentData
from index.shardfiles import ShardRows, empty_rows, make_rows

# A segment becomes visible some time after the timestamp in its key (the flush's put,
# clock skew between hosts). Keys older than this at listing time are assumed complete.
DEFAULT_GRACE_S = 600.0


class IndexBuildError(OperatorError):
    """The segments cannot make a generation (no dim, several models, ...)."""

    exit_code = ExitCode.FAILED


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
                models = sorted({str(m) for m in segment.model_ids[mask]})
                raise IndexBuildError(
                    f"segment {segment.key!r} has dim {segment.dim} (model {', '.join(models)}), "
                    f"others have {dim}: vectors of two models; after a model switch, build "
                    "from the nightly run that re-embedded the catalogue (index finalize --run)"
                )
            dim = segment.dim
        parts.append(_selected(segment, mask))
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
        urls=col["urls"][winners],
        payloads=col["payloads"][winners],
        vectors=np.where(col["tombstones"][winners][:, None], np.float16(0), vectors[winners]),
    )
    return rows, dim, {str(m) for m in col["model_ids"][live]}


def _selected(segment: SegmentData, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image_ids": segment.image_ids[mask],
        "versions": segment.versions[mask],
        "tombstones": segment.tombstones[mask],
        "vectors": segment.vectors[mask],
        "item_ids": segment.item_ids[mask],
        "content_hashes": segment.content_hashes[mask],
        "etags": segment.etags[mask],
        "last_modifieds": segment.last_modifieds[mask],
        "run_ids": segment.run_ids[mask],
        "urls": segment.urls[mask],
        "payloads": segment.payloads[mask],
        "model_ids": segment.model_ids[mask],
    }
