"""One catalogue run end to end: register, publish, snapshot, delete, record as published.

Phases, each resumable (the checkpoint says which one a run is in):

1. *upserts*: the run is registered as ``publishing`` before the first publish; the
   catalogue is read and one job per new image published; checkpoints record how many
   rows are done. A resume re-reads the catalogue, skips those rows (rebuilding the
   de-duplication and the snapshot from them) and leaves out the jobs the broker's
   publish ledger already holds.
2. *deletes*: the run's image snapshot is written; images of the last published run of
   the same catalogue that are gone become delete jobs (unless more than
   ``max_delete_fraction`` of them would go, which stops the run until resumed with
   ``allow_mass_delete`` or without deletes).
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
from dataclasses import dataclass
from pathlib import Path

import producers.nightly.metrics as metrics
from common.brokers.base import Broker
from common.errors import PermanentError, Reason
from common.observability.logging import get_logger
from common.schema import Lane
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


class RunConflictError(PermanentError):
    """There is nothing to resume, or the run cannot be resumed."""

    reason = Reason.BAD_MESSAGE


class RunExistsError(RunConflictError):
    """The run id is taken (a new run without --resume, or a run published already)."""


@dataclass(frozen=True)
class RunOptions:
    run_id: str
    source: str
    catalogue: str = "default"
    lane: Lane = Lane.BULK
    batch_size: int = 500
    in_flight: int = 4
    checkpoint_interval_s: float = 5.0
    progress_interval_s: float = 10.0
    max_rate_per_s: float = 0.0
    delete_missing: bool = True
    max_delete_fraction: float = 0.2
    allow_mass_delete: bool = False
    resume: bool = False
    rejects_path: Path | None = None


class CatalogueRun:
    def __init__(
        self,
        options: RunOptions,
        *,
        broker: Broker,
        storage: Storage,
        registry: RunRegistry,
        on_confirmed: OnConfirmed | None = None,
    ) -> None:
        self.o = options
        self.broker = broker
        self.storage = storage
        self.registry = registry
        self.on_confirmed = on_confirmed
        self.log = get_logger("producer", run_id=options.run_id, source=options.source)
        self._deletes_in_ledger = 0

    async def run(self, open_source: OpenSource) -> PublishReport:
        o = self.o
        started_s = time.monotonic()
        checkpoint, record = self._resume_state()
        lane = Lane(checkpoint.lane) if checkpoint else o.lane
        catalogue = checkpoint.catalogue if checkpoint else o.catalogue
        nightly = lane is Lane.BULK
        if checkpoint and checkpoint.source and checkpoint.source != o.source:
            self.log.warning("resuming from another source", recorded=checkpoint.source)
        started_at_s = (
            record.started_at_s
            if record
            else checkpoint.started_at_s
            if checkpoint
            else time.time()
        )
        base = checkpoint or Checkpoint(
            o.run_id,
            lane=lane.value,
            catalogue=catalogue,
            source=o.source,
            started_at_s=started_at_s,
        )
        metrics.RUN_INFO.labels(o.run_id, catalogue, lane.value).set(1)
        if nightly:
            # Before the first publish: workers may write segments of the run at once, and
            # `index finalize` must see the run and that it is still publishing.
            counts = PublishCounts.from_checkpoint(base)
            self._save_record(base, STATE_PUBLISHING, counts, base.deletes_confirmed)
        # Everything published since the checkpoint is in the ledger. Without a checkpoint
        # nothing was published: the first one is written before the first publish.
        already = (
            await self.broker.ledger_job_ids(o.run_id, since=checkpoint.ledger_position)
            if checkpoint
            else set()
        )
        if checkpoint:
            already -= set(checkpoint.unconfirmed_job_ids)
            self.log.info(
                "resuming",
                phase=checkpoint.phase,
                rows_consumed=checkpoint.rows_consumed,
                jobs_confirmed=checkpoint.jobs_confirmed,
                in_ledger=len(already),
            )
        batches = ConfirmedBatches(
            self.broker,
            ledger=o.run_id,
            in_flight=o.in_flight,
            limiter=TokenBucket(o.max_rate_per_s, burst=max(o.max_rate_per_s, o.batch_size)),
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
            rejects=rejects,
            on_saved=self._progress_record if nightly else None,
        )
        if checkpoint is None:
            await checkpoints.write()
        report = PublishReport(
            run_id=o.run_id,
            lane=lane.value,
            resumed_from_row=checkpoint.rows_consumed if checkpoint else None,
        )
        try:
            counts, snapshot, rejects_kept = await self._upserts(
                open_source, checkpoints, batches, already, rejects, nightly
            )
            report.rejects = rejects_kept
            deleted = await self._deletes(checkpoints, batches, already, snapshot, nightly)
            if checkpoints.current.phase != PHASE_PUBLISHED:
                await checkpoints.write(phase=PHASE_PUBLISHED)
        except BaseException:
            if batches.unconfirmed_job_ids:
                with contextlib.suppress(Exception):  # the original error matters more
                    await checkpoints.record_failed_publishes()
            raise
        finally:
            if rejects is not None:
                rejects.close()
        cp = checkpoints.current
        # The ledger first: once the run reads as published nothing would drop it, and a
        # resume past the published checkpoint publishes nothing, so needs no ledger.
        await self.broker.drop_ledger(o.run_id)
        if nightly:
            self._save_record(cp, STATE_PUBLISHED, counts, deleted)
        report.rows, report.items, report.jobs = counts.rows, counts.items, counts.jobs
        report.rejected, report.duplicate_images = counts.rejected, counts.duplicate_images
        report.already_published = counts.already_published + self._deletes_in_ledger
        report.deleted = deleted
        report.previous_run_id = checkpoints.current.previous_run_id
        report.elapsed_s = time.monotonic() - started_s
        self.log.info("run published", **report.as_dict())
        return report

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

    async def _upserts(
        self,
        open_source: Callable[[], AbstractContextManager[CatalogueSource]],
        checkpoints: CheckpointWriter,
        batches: ConfirmedBatches,
        already: set[str],
        rejects: RejectsFile | None,
        nightly: bool,
    ) -> tuple[PublishCounts, ImageSnapshot | None, list[RejectedRow]]:
        o = self.o
        cp = checkpoints.current
        counts = PublishCounts.from_checkpoint(cp)
        if cp.phase != PHASE_UPSERTS:
            snapshot = load_snapshot(self.storage, o.run_id) if nightly else None
            return counts, snapshot, []
        capacity = self.broker.ledger_capacity(o.batch_size)
        phase = UpsertPhase(
            run_id=o.run_id,
            lane=Lane(cp.lane),
            batch_size=o.batch_size,
            builder=SnapshotBuilder(),
            counts=counts,
            batches=batches,
            checkpoints=checkpoints,
            capacity_calls=capacity,
            already_published=already,
            rejects=rejects,
            log=self.log,
            progress_interval_s=o.progress_interval_s,
        )
        with open_source() as source:
            await phase.run(source)
        snapshot = None
        previous: RunRecord | None = None
        if nightly:
            snapshot = phase.builder.finish()
            await asyncio.to_thread(save_snapshot, self.storage, o.run_id, snapshot)
            if o.delete_missing:
                previous = self.registry.last_published(cp.catalogue, exclude_run_id=o.run_id)
        await checkpoints.write(
            phase=PHASE_DELETES,
            previous_run_id=previous.run_id if previous else None,
            **counts.checkpoint_fields(),
        )
        return counts, snapshot, phase.rejects_kept

    async def _deletes(
        self,
        checkpoints: CheckpointWriter,
        batches: ConfirmedBatches,
        already: set[str],
        snapshot: ImageSnapshot | None,
        nightly: bool,
    ) -> int:
        o = self.o
        cp = checkpoints.current
        if cp.phase == PHASE_PUBLISHED:
            return cp.deletes_confirmed
        if not (nightly and o.delete_missing and cp.previous_run_id):
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
            o.run_id, len(gone), len(previous), o.max_delete_fraction, o.allow_mass_delete
        )
        self.log.info("deletes", images=len(gone), previous_run_id=cp.previous_run_id)
        capacity = self.broker.ledger_capacity(o.batch_size)
        for done, batch in delete_jobs(
            previous, gone, o.run_id, start=cp.deletes_confirmed, batch_size=o.batch_size
        ):
            if capacity is not None and batches.calls_since_mark + 1 > capacity:
                await checkpoints.write(deletes_confirmed=done - len(batch))
            fresh = [job for job in batch if job.job_id not in already]
            self._deletes_in_ledger += len(batch) - len(fresh)
            await batches.submit(fresh)
            if checkpoints.due():
                await checkpoints.write(deletes_confirmed=done)
        await batches.drain()
        await checkpoints.write(
            phase=PHASE_PUBLISHED, deletes_planned=len(gone), deletes_confirmed=len(gone)
        )
        return len(gone)

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
    report = PublishReport(
        run_id=o.run_id,
        lane=o.lane.value,
        rows=counts.rows,
        items=counts.items,
        jobs=counts.jobs,
        duplicate_images=counts.duplicate_images,
        rejected=counts.rejected,
        elapsed_s=time.monotonic() - started_s,
        dry_run=True,
        rejects=phase.rejects_kept,
    )
    deletes: dict[str, object] = {"would_delete": None}
    if storage is not None and registry is not None and o.lane is Lane.BULK and o.delete_missing:
        previous = registry.last_published(o.catalogue, exclude_run_id=o.run_id)
        snapshot = load_snapshot(storage, previous.run_id) if previous else None
        if previous is not None and snapshot is not None:
            gone = len(snapshot.missing_from(phase.builder.finish()))
            report.deleted = gone
            report.previous_run_id = previous.run_id
            deletes = {
                "would_delete": gone,
                "previous_images": len(snapshot),
                "guard_trips": gone > o.max_delete_fraction * len(snapshot),
            }
    return report, deletes
