"""Nightly runs: the run file the producer writes, and whether a run is accounted for.

The producer writes ``runs/<run_id>.json`` (``run_id``, ``source``, ``expected_jobs``,
``started_at_s``, the catalogue name and counts) in state ``publishing`` before it
publishes the run's first job, and again in state ``published`` with the final
``expected_jobs`` once every job is on the broker; a run still publishing cannot be
finalised. Run files of older versions (without a state) read as published. Keys under
``runs/<run_id>/`` (the producer's checkpoint and image snapshot) are not run files.
A job is accounted for when a record
tagged with the run id is in a segment (an upsert or a tombstone) or when the broker
dead-lettered it. The dead-letter figures come from the composition root: this package
never talks to a broker.

A run is finalised once: ``runs/<run_id>.final.json`` records the accounting, whether it
was forced, the generation it published, and what a forced publish of a superseded run
undid (``index.lineage``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

from common.errors import ExitCode, OperatorError
from common.storage.base import Storage
from index.segments import list_segments, read_segment, segment_time_ns

RUNS_PREFIX = "runs/"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
# Segments are keyed by the writer's flush time; a clock a little behind the producer's
# must not hide a run's first segments from its accounting.
RUN_CLOCK_SKEW_S = 600.0


class RunNotFoundError(OperatorError):
    """No run file for the id, or one that is not a valid run."""

    exit_code = ExitCode.FAILED


class RunStillPublishingError(OperatorError):
    """``finalize`` of a run whose producer has not published every job yet."""

    exit_code = ExitCode.FAILED

    def __init__(self, run: RunInfo) -> None:
        super().__init__(
            f"run {run.run_id!r} is still publishing ({run.published_jobs} jobs recorded so "
            "far): its expected job count is not known yet. Wait for `imgfleet produce "
            f"catalogue` to finish, or if it stopped, resume it with --resume {run.run_id}"
        )
        self.run = run


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-200 characters of [A-Za-z0-9_.:-]")
    return run_id


def run_key(run_id: str) -> str:
    return f"{RUNS_PREFIX}{check_run_id(run_id)}.json"


def final_key(run_id: str) -> str:
    return f"{RUNS_PREFIX}{check_run_id(run_id)}.final.json"


RUN_PUBLISHING = "publishing"
RUN_PUBLISHED = "published"
RUN_STATES = (RUN_PUBLISHING, RUN_PUBLISHED)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    source: str
    expected_jobs: int
    started_at_s: float
    catalogue: str = ""
    state: str = RUN_PUBLISHED
    published_jobs: int = 0  # upsert jobs
    deleted_jobs: int = 0  # delete jobs for images gone since the previous run
    rejected_rows: int = 0
    duplicate_images: int = 0
    finished_at_s: float | None = None  # when the producer published the last job

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.expected_jobs < 0:
            raise ValueError(f"expected_jobs must be >= 0, got {self.expected_jobs}")
        if self.state not in RUN_STATES:
            raise ValueError(f"run state must be one of {RUN_STATES}, got {self.state!r}")

    @property
    def publishing(self) -> bool:
        return self.state == RUN_PUBLISHING

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def earliest_segment_ns(self) -> int:
        """Segments of this run have keys at or after this timestamp."""
        return max(int((self.started_at_s - RUN_CLOCK_SKEW_S) * 1e9), 0)


def write_run(storage: Storage, info: RunInfo) -> None:
    """What the producer calls (through the composition root) before publishing jobs."""
    storage.put(run_key(info.run_id), orjson.dumps(info.as_dict()))


def read_run(storage: Storage, run_id: str) -> RunInfo:
    key = run_key(run_id)
    if not storage.exists(key):
        raise RunNotFoundError(f"no run file {key!r}: was the run published with this id?")
    try:
        raw = orjson.loads(storage.get(key))
        finished = raw.get("finished_at_s")
        return RunInfo(
            run_id=str(raw["run_id"]),
            source=str(raw.get("source", "")),
            expected_jobs=int(raw["expected_jobs"]),
            started_at_s=float(raw["started_at_s"]),
            catalogue=str(raw.get("catalogue", "")),
            state=str(raw.get("state", RUN_PUBLISHED)),
            published_jobs=int(raw.get("published_jobs", 0)),
            deleted_jobs=int(raw.get("deleted_jobs", 0)),
            rejected_rows=int(raw.get("rejected_rows", 0)),
            duplicate_images=int(raw.get("duplicate_images", 0)),
            finished_at_s=None if finished is None else float(finished),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RunNotFoundError(f"run file {key!r} is not a valid run: {exc}") from exc


def ensure_published(run: RunInfo) -> None:
    """Raise unless the producer has published every job of the run."""
    if run.publishing:
        raise RunStillPublishingError(run)


def list_run_ids(storage: Storage) -> list[str]:
    """The id of every run file (not the finalisations, not the keys under a run's folder)."""
    ids = []
    for key in storage.list(RUNS_PREFIX):
        name = key[len(RUNS_PREFIX) :]
        if name.endswith(".json") and not name.endswith(".final.json") and "/" not in name:
            ids.append(name.removesuffix(".json"))
    return ids


def nightly_runs(storage: Storage) -> frozenset[str]:
    """Ids of every nightly run: their records belong to the generation built from them."""
    return frozenset(list_run_ids(storage))


def list_runs(storage: Storage) -> list[RunInfo]:
    runs = [read_run(storage, run_id) for run_id in list_run_ids(storage)]
    return sorted(runs, key=lambda r: r.started_at_s)


@dataclass(frozen=True)
class RunAccounting:
    run_id: str
    expected_jobs: int
    indexed_jobs: int  # distinct images with a record of the run (upsert or tombstone)
    dead_lettered_jobs: int
    segments_scanned: int
    segments_with_run: list[str] = field(default_factory=list)

    @property
    def accounted_jobs(self) -> int:
        return self.indexed_jobs + self.dead_lettered_jobs

    @property
    def missing_jobs(self) -> int:
        return max(self.expected_jobs - self.accounted_jobs, 0)

    @property
    def complete(self) -> bool:
        return self.missing_jobs == 0

    def as_dict(self) -> dict[str, Any]:
        counted = {
            "accounted_jobs": self.accounted_jobs,
            "missing_jobs": self.missing_jobs,
            "complete": self.complete,
        }
        return asdict(self) | counted | {"segments_with_run": len(self.segments_with_run)}


def account_run(
    storage: Storage,
    run: RunInfo,
    *,
    dead_lettered_jobs: int = 0,
    dead_lettered_image_ids: Collection[int] | None = None,
) -> RunAccounting:
    """Count the run's jobs that are settled.

    A job in ``dead_lettered_image_ids`` that was later indexed (ops requeued it) counts
    once; ``dead_lettered_jobs`` (letters whose image id is unknown) are added as they are.
    """
    seen: list[np.ndarray] = []
    scanned = 0
    with_run: list[str] = []
    for key in list_segments(storage):
        if segment_time_ns(key) < run.earliest_segment_ns:
            continue
        scanned += 1
        segment = read_segment(storage, key)
        mine = segment.run_ids == run.run_id
        if mine.any():
            seen.append(segment.image_ids[mine])
            with_run.append(key)
    indexed = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
    dead_count = int(dead_lettered_jobs)
    if dead_lettered_image_ids is not None:
        dead = np.unique(np.fromiter(dead_lettered_image_ids, dtype=np.int64))
        dead_count += int(np.setdiff1d(dead, indexed, assume_unique=True).shape[0])
    return RunAccounting(
        run_id=run.run_id,
        expected_jobs=run.expected_jobs,
        indexed_jobs=int(indexed.shape[0]),
        dead_lettered_jobs=dead_count,
        segments_scanned=scanned,
        segments_with_run=with_run,
    )


def write_finalization(
    storage: Storage,
    accounting: RunAccounting,
    *,
    forced: bool,
    generation: int | None,
    undoes: str | None = None,
) -> dict[str, Any]:
    """``undoes``: the newer catalogue state a forced publish replaced (``index.lineage``)."""
    record = {
        **accounting.as_dict(),
        "forced": forced,
        "generation": generation,
        "undoes": undoes,
        "finalized_at_s": time.time(),
    }
    storage.put(final_key(accounting.run_id), orjson.dumps(record))
    return record


def read_finalization(storage: Storage, run_id: str) -> dict[str, Any] | None:
    key = final_key(run_id)
    if not storage.exists(key):
        return None
    data: dict[str, Any] = orjson.loads(storage.get(key))
    return data
