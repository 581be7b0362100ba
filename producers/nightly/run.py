"""One catalogue run end to end: register, publish, snapshot, delete, record as published.

Phases, each resumable (the checkpoint says which one a run is in):

1. *upserts*: the run is registered as ``publishing`` before the first publish; the
   catalogue is read once to find each repeated item's winning row, then again to publish
   one job per image of each item's winning row; checkpoints record how many rows are
   done. A resume reads the catalogue again (the same winners), skips those rows
   (rebuilding the de-duplication and the snapshot from them) and leaves out the jobs the
   broker's publish ledger already holds. Then the items of rejected rows that no row
   published are kept: their images are published again from the last published run's
   snapshot (``producers.nightly.kept``; checkpointed by ``kept_confirmed``).
2. *deletes*: the run's image snapshot is written; images of the last published run of
   the same catalogue that are gone become delete jobs (unless more than
   ``max_delete_fraction`` of them would go, which stops the run until resumed with
   ``allow_mass_delete`` or without deletes). Kept images are in the snapshot, so a
   rejected row never deletes, and the guard counts only real deletions.
3. *published*: the run is recorded as ``published`` with its expected job count, and
   the ledger dropped.

Live-lane runs are publish-only: no registration, snapshot or deletes (their jobs are
applied live, not built into a nightly generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.brokers.base import ProducerBroker
from common.config import ProducerConfig
from common.errors import ExitCode, OperatorError
from common.observability.logging import get_logger
from common.observability.metrics import ProducerMetrics
from common.schema import Job, Lane
from common.storage.base import Storage
from producers.catalogue.reader import RejectedRow
from producers.catalogue.rejects import RejectsFile
from producers.nightly.batches import ConfirmedBatches, OnConfirmed
from producers.nightly.checkpoint import (
    PHASE_DELETES,
    PHASE_PUBLISHED,
    PHASE_UPSERTS,
    Checkpoint,
    CheckpointWriter,
    load_checkpoint,
)
from producers.nightly.deletes import check_delete_guard, delete_jobs
from producers.nightly.kept import kept_batches, kept_images, kept_item_count
from producers.nightly.rate_limit import TokenBucket
from producers.nightly.run_record import STATE_PUBLISHED, STATE_PUBLISHING, RunRecord, RunRegistry
from producers.nightly.snapshot import ImageSnapshot, SnapshotBuilder, load_snapshot, save_snapshot
from producers.nightly.upserts import CatalogueSource, PublishCounts, PublishReport, UpsertPhase

OpenSource = Callable[[], AbstractContextManager[CatalogueSource]]


def _rejects_length(checkpoint: Checkpoint | None, path: Path) -> int | None:
    """Where to cut the rejects file on resume: only the same file as the checkpoint's."""
    if checkpoint is None or checkpoint.rejects_path != str(Path(path).resolve()):
        return None
    return checkpoint.rejects_bytes


class RunConflictError(OperatorError):
    """There is nothing to resume, or the run cannot be resumed."""

    exit_code = ExitCode.CONFIG  # a usage error: another --run-id or --resume is needed


class RunExistsError(RunConflictError):
    """The run id is taken (a new run without --resume, or a run published already)."""

    exit_code = ExitCode.RUN_EXISTS


# Defaults are [producer]'s, so a run built without settings (tests, benchmarks) follows
# the config when a default changes.
_PRODUCER = ProducerConfig()


@dataclass(frozen=True)
class RunOptions:
    run_id: str
    source: str
    catalogue: str = _PRODUCER.catalogue_name
    lane: Lane = Lane.BULK
    batch_size: int = _PRODUCER.batch_size
    in_flight: int = _PRODUCER.publish_in_flight
    checkpoint_interval_s: float = _PRODUCER.checkpoint_interval_s
    progress_interval_s: float = _PRODUCER.progress_interval_s
    max_rate_per_s: float = _PRODUCER.max_rate_per_s
    delete_missing: bool = _PRODUCER.delete_missing
    max_delete_fraction: float = _PRODUCER.max_delete_fraction
    allow_mass_delete: bool = False
    resume: bool = False
    rejects_path: Path | None = None


@dataclass
class _RunState:
    """What the phases of one run share, set up by ``CatalogueRun._prepare``."""

    resumed_from: Checkpoint | None  # None: a new run (or one started over)
    lane: Lane
    nightly: bool  # a bulk run: registered, snapshotted, with deletes
    already: set[str]  # job ids the ledger holds: published before the resume
    batches: ConfirmedBatches
    checkpoints: CheckpointWriter
    rejects: RejectsFile | None


@dataclass(eq=False)
class CatalogueRun:
    """One run of ``options``; ``on_confirmed`` is called with each batch the broker confirmed.

    ``metrics`` counts what the run read and published (default: a registry nobody serves).
    """

    o: RunOptions
    _: KW_ONLY
    broker: ProducerBroker
    storage: Storage
    registry: RunRegistry
    on_confirmed: OnConfirmed | None = None
    metrics: ProducerMetrics = field(default_factory=ProducerMetrics)
    log: Any = field(init=False, repr=False)
    _deletes_in_ledger: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = get_logger("producer", run_id=self.o.run_id, source=self.o.source)

    async def run(self, open_source: OpenSource) -> PublishReport:
        started_s = time.monotonic()
        state = await self._prepare()
        counts, deleted, rejects_kept = await self._phases(open_source, state)
        await self._record_published(state, counts, deleted)
        return self._report(state, counts, deleted, rejects_kept, time.monotonic() - started_s)

    # -- set-up ------------------------------------------------------------------------

    async def _prepare(self) -> _RunState:
        """Resume state, registration, the publisher, the checkpoints and the rejects file."""
        o = self.o
        checkpoint, record = self._resume_state()
        base = self._base_checkpoint(checkpoint, record)
        lane = Lane(base.lane)
        nightly = lane is Lane.BULK
        self.metrics.run_info.labels(o.run_id, base.catalogue, lane.value).set(1)
        if nightly:
            # Before the first publish: workers may write segments of the run at once, and
            # `index finalize` must see the run and that it is still publishing.
            counts = PublishCounts.from_checkpoint(base)
            self._save_record(base, STATE_PUBLISHING, counts, base.deletes_confirmed)
        already = await self._already_published(checkpoint)
        batches = ConfirmedBatches(
            self.broker,
            ledger=o.run_id,
            in_flight=o.in_flight,
            limiter=TokenBucket(o.max_rate_per_s, burst=max(o.max_rate_per_s, o.batch_size)),
            metrics=self.metrics,
            on_confirmed=self.on_confirmed,
        )
        rejects = (
            RejectsFile(o.rejects_path, truncate_to=_rejects_length(checkpoint, o.rejects_path))
            if o.rejects_path
            else None
        )
        checkpoints = CheckpointWriter(
            self.storage,
            self.broker,
            o.run_id,
            batches,
            base,
            interval_s=o.checkpoint_interval_s,
            metrics=self.metrics,
            rejects=rejects,
            on_saved=self._progress_record if nightly else None,
        )
        if checkpoint is None:
            await checkpoints.write()
        return _RunState(checkpoint, lane, nightly, already, batches, checkpoints, rejects)

    def _resume_state(self) -> tuple[Checkpoint | None, RunRecord | None]:
        o = self.o
        checkpoint = load_checkpoint(self.storage, o.run_id)
        record = self.registry.load(o.run_id)
        if not o.resume:
            if checkpoint is not None or record is not None:
                raise RunExistsError(
                    f"run {o.run_id!r} exists already; resume it with --resume {o.run_id} "
                    "or choose another --run-id"
                )
            return None, None
        if checkpoint is None:
            if record is None:
                raise RunConflictError(f"there is no run {o.run_id!r} to resume")
            if record.state == STATE_PUBLISHED:
                raise RunExistsError(f"run {o.run_id!r} is published already")
            return None, record  # stopped before its first publish: start it over
        done = checkpoint.phase == PHASE_PUBLISHED and record is None  # a live-lane run
        if done or (record is not None and record.state == STATE_PUBLISHED):
            raise RunExistsError(f"run {o.run_id!r} is published already")
        return checkpoint, record

    def _base_checkpoint(
        self, checkpoint: Checkpoint | None, record: RunRecord | None
    ) -> Checkpoint:
        """The resume point; a new run's first one keeps a started-over run's start time."""
        o = self.o
        if checkpoint is not None:
            if checkpoint.source and checkpoint.source != o.source:
                self.log.warning("resuming from another source", recorded=checkpoint.source)
            return checkpoint
        return Checkpoint(
            o.run_id,
            lane=o.lane.value,
            catalogue=o.catalogue,
            source=o.source,
            started_at_s=record.started_at_s if record else time.time(),
        )

    async def _already_published(self, checkpoint: Checkpoint | None) -> set[str]:
        """Everything published since the checkpoint is in the ledger. Without a checkpoint
        nothing was published: the first one is written before the first publish."""
        if checkpoint is None:
            return set()
        already = await self.broker.ledger_job_ids(self.o.run_id, since=checkpoint.ledger_position)
        already -= set(checkpoint.unconfirmed_job_ids)
        self.log.info(
            "resuming",
            phase=checkpoint.phase,
            rows_consumed=checkpoint.rows_consumed,
            jobs_confirmed=checkpoint.jobs_confirmed,
            in_ledger=len(already),
        )
        return already

    # -- phases ------------------------------------------------------------------------

    async def _phases(
        self, open_source: OpenSource, state: _RunState
    ) -> tuple[PublishCounts, int, list[RejectedRow]]:
        """Upserts, deletes, the published checkpoint: (counts, deletes, rejects kept)."""
        checkpoints = state.checkpoints
        try:
            counts, snapshot, rejects_kept = await self._upserts(open_source, state)
            deleted = await self._deletes(state, snapshot)
            if checkpoints.current.phase != PHASE_PUBLISHED:
                await checkpoints.write(phase=PHASE_PUBLISHED)
        except BaseException:
            if state.batches.unconfirmed_job_ids:
                with contextlib.suppress(Exception):  # the original error matters more
                    await checkpoints.record_failed_publishes()
            raise
        finally:
            if state.rejects is not None:
                state.rejects.close()
        return counts, deleted, rejects_kept

    async def _upserts(
        self, open_source: OpenSource, state: _RunState
    ) -> tuple[PublishCounts, ImageSnapshot | None, list[RejectedRow]]:
        o = self.o
        checkpoints = state.checkpoints
        cp = checkpoints.current
        counts = PublishCounts.from_checkpoint(cp)
        if cp.phase != PHASE_UPSERTS:
            snapshot = load_snapshot(self.storage, o.run_id) if state.nightly else None
            return counts, snapshot, []
        capacity = self.broker.ledger_capacity(o.batch_size)
        phase = UpsertPhase(
            run_id=o.run_id,
            lane=Lane(cp.lane),
            batch_size=o.batch_size,
            builder=SnapshotBuilder(),
            counts=counts,
            batches=state.batches,
            metrics=self.metrics,
            checkpoints=checkpoints,
            capacity_calls=capacity,
            already_published=state.already,
            rejects=state.rejects,
            log=self.log,
            progress_interval_s=o.progress_interval_s,
        )
        with open_source() as source:
            await phase.run(source)
        snapshot = None
        previous_run_id: str | None = None
        if state.nightly:
            # Pinned by the checkpoint once kept images go out, so a resume keeps the same.
            previous_run_id = checkpoints.current.previous_run_id or self._previous_run_id(
                cp.catalogue
            )
            await self._keep(state, phase, counts, previous_run_id)
            snapshot = phase.builder.finish()
            await asyncio.to_thread(save_snapshot, self.storage, o.run_id, snapshot)
        await checkpoints.write(
            phase=PHASE_DELETES, previous_run_id=previous_run_id, **counts.checkpoint_fields()
        )
        return counts, snapshot, phase.rejects_kept

    def _previous_run_id(self, catalogue: str) -> str | None:
        previous = self.registry.last_published(catalogue, exclude_run_id=self.o.run_id)
        return previous.run_id if previous else None

    async def _keep(
        self,
        state: _RunState,
        phase: UpsertPhase,
        counts: PublishCounts,
        previous_run_id: str | None,
    ) -> None:
        """Publish again, from the previous run's snapshot, the images of items whose rows
        were rejected and that no row of this run published."""
        o = self.o
        checkpoints, batches = state.checkpoints, state.batches
        previous, kept = await _kept_of(self.storage, previous_run_id, phase)
        if previous is None or len(kept) == 0:
            return
        if checkpoints.current.previous_run_id != previous_run_id:
            await checkpoints.write(previous_run_id=previous_run_id, **counts.checkpoint_fields())
        start = checkpoints.current.kept_confirmed
        capacity = self.broker.ledger_capacity(o.batch_size)
        jobs_total = 0
        begin = 0
        for done, jobs in kept_batches(
            previous, kept, phase.builder, run_id=o.run_id, lane=state.lane, batch_size=o.batch_size
        ):
            jobs_total += len(jobs)
            batch_begin, begin = begin, done
            if done <= start:
                continue  # confirmed before the resume point
            counts.already_published += await _submit_resumable(
                state, jobs, capacity, "kept_confirmed", batch_begin, done
            )
        await batches.drain()
        _count_kept(counts, previous, kept, jobs_total)
        self.log.info(
            "rejected items kept as the previous run had them",
            items=counts.kept_items,
            images=counts.kept_images,
            jobs=jobs_total,
            previous_run_id=previous_run_id,
        )
        if jobs_total < len(kept):
            self.log.warning(
                "kept images without a URL in the previous run's snapshot (an older "
                "format): not deleted, but they leave the next generation",
                images=len(kept) - jobs_total,
                previous_run_id=previous_run_id,
            )

    async def _deletes(self, state: _RunState, snapshot: ImageSnapshot | None) -> int:
        o = self.o
        checkpoints, batches = state.checkpoints, state.batches
        cp = checkpoints.current
        if cp.phase == PHASE_PUBLISHED:
            return cp.deletes_confirmed
        if not (state.nightly and o.delete_missing and cp.previous_run_id):
            return 0
        previous = load_snapshot(self.storage, cp.previous_run_id)
        if previous is None:
            self.log.warning(
                "the previous run has no image snapshot; no deletes",
                previous_run_id=cp.previous_run_id,
            )
            return 0
        if snapshot is None:
            raise RunConflictError(f"run {o.run_id!r} lost its image snapshot; cannot resume")
        gone = previous.missing_from(snapshot)
        check_delete_guard(
            o.run_id,
            len(gone),
            len(previous),
            o.max_delete_fraction,
            o.allow_mass_delete,
            kept_items=cp.kept_items,
            rejected_unattributed=cp.rejected_unattributed,
        )
        self.log.info("deletes", images=len(gone), previous_run_id=cp.previous_run_id)
        capacity = self.broker.ledger_capacity(o.batch_size)
        for done, batch in delete_jobs(
            previous, gone, o.run_id, start=cp.deletes_confirmed, batch_size=o.batch_size
        ):
            self._deletes_in_ledger += await _submit_resumable(
                state, batch, capacity, "deletes_confirmed", done - len(batch), done
            )
        await batches.drain()
        await checkpoints.write(
            phase=PHASE_PUBLISHED, deletes_planned=len(gone), deletes_confirmed=len(gone)
        )
        return len(gone)

    # -- the end -----------------------------------------------------------------------

    async def _record_published(
        self, state: _RunState, counts: PublishCounts, deleted: int
    ) -> None:
        # The ledger first: once the run reads as published nothing would drop it, and a
        # resume past the published checkpoint publishes nothing, so needs no ledger.
        await self.broker.drop_ledger(self.o.run_id)
        if state.nightly:
            self._save_record(state.checkpoints.current, STATE_PUBLISHED, counts, deleted)

    def _report(
        self,
        state: _RunState,
        counts: PublishCounts,
        deleted: int,
        rejects_kept: list[RejectedRow],
        elapsed_s: float,
    ) -> PublishReport:
        resumed = state.resumed_from
        report = PublishReport.of(
            self.o.run_id,
            state.lane.value,
            counts,
            deleted=deleted,
            already_published=counts.already_published + self._deletes_in_ledger,
            resumed_from_row=resumed.rows_consumed if resumed else None,
            previous_run_id=state.checkpoints.current.previous_run_id,
            elapsed_s=elapsed_s,
            rejects=rejects_kept,
        )
        self.log.info("run published", **report.as_dict())
        return report

    # -- the run file ------------------------------------------------------------------

    def _progress_record(self, cp: Checkpoint) -> None:
        # The run file follows the checkpoints, so `imgfleet status` sees the run grow.
        if cp.phase != PHASE_PUBLISHED:
            counts = PublishCounts.from_checkpoint(cp)
            self._save_record(cp, STATE_PUBLISHING, counts, cp.deletes_confirmed)

    def _save_record(self, cp: Checkpoint, state: str, counts: PublishCounts, deleted: int) -> None:
        self.registry.save(
            RunRecord(
                run_id=self.o.run_id,
                source=self.o.source,
                catalogue=cp.catalogue,
                state=state,
                started_at_s=cp.started_at_s,
                expected_jobs=counts.jobs + deleted,
                published_jobs=counts.jobs,
                deleted_jobs=deleted,
                rejected_rows=counts.rejected,
                duplicate_images=counts.duplicate_images,
                finished_at_s=time.time() if state == STATE_PUBLISHED else None,
            )
        )


async def dry_run(
    open_source: OpenSource,
    options: RunOptions,
    *,
    storage: Storage | None = None,
    registry: RunRegistry | None = None,
    metrics: ProducerMetrics | None = None,
) -> tuple[PublishReport, dict[str, object]]:
    """Read and check the whole catalogue, count what a run would publish; send nothing.

    Returns the report and what the deletes would be (against the last published run of
    the catalogue, where storage and registry are given).
    """
    o = options
    log = get_logger("producer", run_id=o.run_id, source=o.source, dry_run=True)
    started_s = time.monotonic()
    counts = PublishCounts()
    rejects = RejectsFile(o.rejects_path) if o.rejects_path else None
    phase = UpsertPhase(
        run_id=o.run_id,
        lane=o.lane,
        batch_size=o.batch_size,
        builder=SnapshotBuilder(),
        counts=counts,
        batches=None,
        metrics=metrics or ProducerMetrics(),
        rejects=rejects,
        log=log,
        progress_interval_s=o.progress_interval_s,
    )
    try:
        with open_source() as source:
            await phase.run(source)
    finally:
        if rejects is not None:
            rejects.close()
    deletes: dict[str, object] = {"would_delete": None}
    previous_run_id: str | None = None
    snapshot: ImageSnapshot | None = None
    if storage is not None and registry is not None and o.lane is Lane.BULK:
        previous = registry.last_published(o.catalogue, exclude_run_id=o.run_id)
        previous_run_id = previous.run_id if previous else None
        snapshot, kept = await _kept_of(storage, previous_run_id, phase)
        if snapshot is not None and len(kept):
            jobs = sum(
                len(j) for _, j in kept_batches(snapshot, kept, phase.builder, run_id=o.run_id)
            )
            _count_kept(counts, snapshot, kept, jobs)
        if snapshot is None and previous_run_id is not None and o.delete_missing:
            snapshot = load_snapshot(storage, previous_run_id)
    report = PublishReport.of(
        o.run_id,
        o.lane.value,
        counts,
        elapsed_s=time.monotonic() - started_s,
        dry_run=True,
        rejects=phase.rejects_kept,
    )
    if snapshot is not None and o.delete_missing:
        gone = len(snapshot.missing_from(phase.builder.finish()))
        report.deleted = gone
        report.previous_run_id = previous_run_id
        deletes = {
            "would_delete": gone,
            "previous_images": len(snapshot),
            "guard_trips": gone > o.max_delete_fraction * len(snapshot),
        }
    return report, deletes


async def _kept_of(
    storage: Storage, previous_run_id: str | None, phase: UpsertPhase
) -> tuple[ImageSnapshot | None, np.ndarray]:
    """The previous run's snapshot and the indexes of its images this run keeps; the
    snapshot is read only when a rejected row names an item."""
    none = np.zeros(0, np.int64)
    rejected = phase.rejected_item_keys()
    if previous_run_id is None or len(rejected) == 0:
        return None, none
    previous = await asyncio.to_thread(load_snapshot, storage, previous_run_id)
    if previous is None:
        return None, none
    return previous, kept_images(previous, rejected, phase.builder.item_keys())


def _count_kept(
    counts: PublishCounts, previous: ImageSnapshot, kept: np.ndarray, jobs: int
) -> None:
    counts.kept_images += len(kept)
    counts.kept_items += kept_item_count(previous, kept)
    counts.jobs += jobs


async def _submit_resumable(
    state: _RunState, jobs: list[Job], capacity: int | None, field: str, begin: int, done: int
) -> int:
    """One batch of a resumable phase (kept images, deletes); what the ledger already had.

    The checkpoint records ``field`` = ``begin`` before a publish that would overflow the
    broker's ledger, and ``done`` whenever a checkpoint is due, so a resume skips exactly
    the confirmed batches.
    """
    checkpoints, batches = state.checkpoints, state.batches
    if capacity is not None and batches.calls_since_mark + 1 > capacity:
        await checkpoints.write(**{field: begin})
    fresh = [job for job in jobs if job.job_id not in state.already]
    await batches.submit(fresh)
    if checkpoints.due():
        await checkpoints.write(**{field: done})
    return len(jobs) - len(fresh)
