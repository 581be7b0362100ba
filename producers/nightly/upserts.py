"""Turn catalogue items into jobs and publish them in confirmed batches.

One job per image: ``job_id = job_id_for(run_id, image_id, op)``, so the same job
published again by a resumed run keeps its id. One row per item is published: the newest
version, of equal ones the first (``producers.nightly.winners``, which needs a first pass
over the catalogue before anything is published); the other rows of the item are counted
as superseded (an older version) or repeated, or rejected when they give the winning
version with other URLs. Batches go to the broker with up to ``in_flight`` of them
awaiting confirms; ``broker.publish`` returns only once its jobs are durable.

The upsert phase reads the catalogue on a thread in chunks of rows. A checkpoint (see
``producers.nightly.checkpoint``) is only written at a chunk boundary after every batch before it
is confirmed, so "the first ``rows_consumed`` rows are published" holds exactly.

A rejected row that names its item is remembered by item key (8 bytes each), so the run
can keep that item as the previous run had it (``producers.nightly.kept``).
"""

from __future__ import annotations

import contextlib
import math
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.brokers.base import ProducerBroker
from common.errors import ConfigError
from common.identity import image_id_for
from common.observability.logging import get_logger
from common.observability.metrics import ProducerMetrics
from common.observability.progress import Progress
from common.schema import MAX_ITEM_ID_CHARS, MAX_URL_CHARS, Job, Lane
from producers.catalogue.reader import CatalogueItem, RejectedRow, open_catalogue
from producers.catalogue.rejects import RejectsFile
from producers.catalogue.sources import CatalogueChangedError
from producers.catalogue.threaded import chunks_in_thread
from producers.jobs import upsert_job, upsert_job_id
from producers.nightly.batches import ConfirmedBatches
from producers.nightly.checkpoint import Checkpoint, CheckpointWriter
from producers.nightly.rate_limit import TokenBucket
from producers.nightly.snapshot import SnapshotBuilder
from producers.nightly.winners import ItemVersions, Winners, content_key, item_key, row_key

CHUNK_ROWS = 1000
MAX_REJECTS_KEPT = 1000  # in the report; the rejects file has all of them
MAX_REJECTS_LOGGED = 20


class CatalogueSource(Protocol):
    """An opened catalogue (``producers.catalogue.reader.Catalogue`` is one).

    Iterated twice by a run (the first pass finds each item's winning row), each time
    from the start, with the same rows; a row's ``line`` is unique.
    """

    def __iter__(self) -> Iterator[CatalogueItem | RejectedRow]: ...

    def fraction_done(self) -> float | None: ...


def row_problem(item: CatalogueItem) -> str | None:
    """Why an item cannot become jobs (the job schema's limits, checked per row so a bad
    row is rejected), or None."""
    if len(item.item_id) > MAX_ITEM_ID_CHARS:
        return f"item id longer than {MAX_ITEM_ID_CHARS} characters"
    for url in item.image_urls:
        if len(url) > MAX_URL_CHARS:
            return f"image URL longer than {MAX_URL_CHARS} characters"
    return None


@dataclass
class PublishCounts:
    rows: int = 0
    items: int = 0  # rows published (one per item)
    rejected: int = 0
    rejected_unattributed: int = 0  # rejected rows without a readable item id
    duplicate_images: int = 0  # images of exact repeats of an item's published row
    superseded_rows: int = 0  # rows of an item that a newer version in the file replaced
    kept_items: int = 0  # items whose rows were all rejected, kept as the last run had them
    kept_images: int = 0
    jobs: int = 0  # distinct upsert jobs of the run, published now or before a resume
    already_published: int = 0  # found in the ledger on resume, so not sent again

    def add(self, other: PublishCounts) -> None:
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def from_checkpoint(cls, cp: Checkpoint) -> PublishCounts:
        return cls(**{name: getattr(cp, saved) for name, saved in _IN_CHECKPOINT.items()})

    def checkpoint_fields(self) -> dict[str, int]:
        return {saved: getattr(self, name) for name, saved in _IN_CHECKPOINT.items()}


# The counts a checkpoint saves, and their names there (already_published is found again
# from the ledger on resume, so it is not saved).
_IN_CHECKPOINT = {
    "rows": "rows_consumed",
    "items": "items",
    "rejected": "rejected",
    "rejected_unattributed": "rejected_unattributed",
    "duplicate_images": "duplicate_images",
    "superseded_rows": "superseded_rows",
    "kept_items": "kept_items",
    "kept_images": "kept_images",
    "jobs": "jobs_confirmed",
}

_COUNT_FIELDS = (*_IN_CHECKPOINT, "already_published")


@dataclass
class PublishReport:
    run_id: str
    lane: str = "bulk"
    rows: int = 0
    items: int = 0
    jobs: int = 0
    deleted: int = 0
    duplicate_images: int = 0
    superseded_rows: int = 0
    rejected: int = 0
    rejected_unattributed: int = 0
    kept_items: int = 0
    kept_images: int = 0
    already_published: int = 0
    resumed_from_row: int | None = None
    previous_run_id: str | None = None
    elapsed_s: float = 0.0
    dry_run: bool = False
    rejects: list[RejectedRow] = field(default_factory=list)

    @property
    def expected_jobs(self) -> int:
        return self.jobs + self.deleted

    @classmethod
    def of(cls, run_id: str, lane: str, counts: PublishCounts, **extra: Any) -> PublishReport:
        # Every count but already_published, which the caller passes when it has one.
        reported = {name: getattr(counts, name) for name in _IN_CHECKPOINT}
        return cls(run_id=run_id, lane=lane, **reported, **extra)

    def as_dict(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "lane": self.lane,
            "rows": self.rows,
            "items": self.items,
            "jobs": self.jobs,
            "deleted": self.deleted,
            "expected_jobs": self.expected_jobs,
            "duplicate_images": self.duplicate_images,
            "superseded_rows": self.superseded_rows,
            "rejected": self.rejected,
            # Rejected rows never delete: their items are kept as the last run had them
            # (kept_items, republished in `jobs`); rows without an item id cannot keep one.
            "rejected_unattributed": self.rejected_unattributed,
            "kept_items": self.kept_items,
            "kept_images": self.kept_images,
            "already_published": self.already_published,
            "resumed_from_row": self.resumed_from_row,
            "previous_run_id": self.previous_run_id,
            "elapsed_s": round(self.elapsed_s, 3),
            "jobs_per_s": round(self.expected_jobs / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "dry_run": self.dry_run,
        }


class RunProgress(Progress):
    """Progress in rows, with the ETA from how much of the catalogue was read."""

    def __init__(
        self,
        log: Any,
        fraction_done: Callable[[], float | None],
        total_rows: int | None,
        interval_s: float,
    ) -> None:
        super().__init__(log, "catalogue rows", total_rows, interval_s)
        self.fraction_done = fraction_done

    def eta_s(self) -> float | None:
        fraction = self.fraction_done()
        if fraction is None or fraction <= 0:
            return super().eta_s()
        elapsed_s = time.monotonic() - self.started_s
        return elapsed_s * (1.0 - min(fraction, 1.0)) / fraction


def _no_fraction() -> float | None:
    return None


@dataclass
class _Images:
    """One chunk's images: item slot, id, key (position) and whether new to the run."""

    item_of: list[int]
    image_ids: list[int]
    keys: list[int]
    fresh: np.ndarray


def _usable(entry: CatalogueItem | RejectedRow) -> CatalogueItem | RejectedRow:
    """The entry, or the reject ``row_problem`` makes of it."""
    if isinstance(entry, RejectedRow):
        return entry
    problem = row_problem(entry)
    if problem is None:
        return entry
    attributed = entry.item_id if len(entry.item_id) <= MAX_ITEM_ID_CHARS else None
    return RejectedRow(entry.line, problem, entry.item_id[:200], attributed)


@dataclass(eq=False, kw_only=True)
class UpsertPhase:
    """Reads the catalogue and publishes one job per new image; resumable by rows."""

    run_id: str
    lane: Lane
    batch_size: int
    builder: SnapshotBuilder
    counts: PublishCounts
    batches: ConfirmedBatches | None
    metrics: ProducerMetrics
    checkpoints: CheckpointWriter | None = None
    capacity_calls: int | None = None
    already_published: InitVar[set[str] | None] = None
    rejects: RejectsFile | None = None
    log: Any = None
    progress_interval_s: float = 10.0
    rejects_kept: list[RejectedRow] = field(default_factory=list, init=False)
    already: set[str] = field(init=False, repr=False)
    skip_rows: int = field(init=False)
    _rejects_logged: int = field(default=0, init=False)
    _outgoing: list[Job] = field(default_factory=list, init=False, repr=False)
    _started_s: float = field(default_factory=time.monotonic, init=False, repr=False)
    _jobs_at_start: int = field(init=False, repr=False)
    _winners: Winners = field(default_factory=Winners.none, init=False, repr=False)
    _winners_met: int = field(default=0, init=False)
    _rows_in_first_pass: int = field(default=0, init=False)
    # item keys of rejected rows that name their item
    _rejected_keys: array[int] = field(default_factory=lambda: array("q"), init=False, repr=False)

    def __post_init__(self, already_published: set[str] | None) -> None:
        self.skip_rows = self.counts.rows
        self._jobs_at_start = self.counts.jobs
        self.already = already_published or set()
        self.log = self.log or get_logger("producer", run_id=self.run_id)

    def rejected_item_keys(self) -> np.ndarray:
        """Item keys named by the rejected rows read so far (repeats included)."""
        return np.frombuffer(self._rejected_keys, np.int64).copy()

    async def _first_pass(self, source: Iterable[CatalogueItem | RejectedRow]) -> None:
        """Find the winning row of every item listed more than once."""
        started_s = time.monotonic()
        versions = ItemVersions()
        entries = 0
        progress = RunProgress(
            self.log,
            getattr(source, "fraction_done", _no_fraction),
            getattr(source, "total_rows_hint", None),
            self.progress_interval_s,
        )
        progress.what = "catalogue rows, first pass (repeated items)"
        async with contextlib.aclosing(chunks_in_thread(source, chunk_rows=CHUNK_ROWS)) as chunks:
            async for chunk in chunks:
                entries += len(chunk)
                progress.advance(len(chunk))
                for entry in chunk:
                    entry = _usable(entry)
                    if isinstance(entry, CatalogueItem):
                        versions.add(
                            row_key(entry.item_id),
                            entry.version,
                            entry.line,
                            content_key(entry.image_urls, entry.etag),
                        )
        peak_bytes = versions.nbytes
        self._winners = versions.finish()
        self._rows_in_first_pass = entries
        self.log.info(
            "catalogue read for repeated items",
            rows=entries,
            repeated_items=len(self._winners),
            table_bytes=peak_bytes,
            elapsed_s=round(time.monotonic() - started_s, 3),
        )

    async def run(self, source: Iterable[CatalogueItem | RejectedRow]) -> None:
        await self._first_pass(source)
        fraction = getattr(source, "fraction_done", _no_fraction)
        progress = RunProgress(
            self.log, fraction, getattr(source, "total_rows_hint", None), self.progress_interval_s
        )
        row = 0
        # aclosing: an error in here stops the reader thread now, not at garbage collection.
        async with contextlib.aclosing(chunks_in_thread(source, chunk_rows=CHUNK_ROWS)) as chunks:
            async for chunk in chunks:
                if row < self.skip_rows:
                    # Published before the resume point: rebuild de-duplication and snapshot.
                    skipped = min(len(chunk), self.skip_rows - row)
                    self._remember(chunk[:skipped])
                    row += skipped
                    chunk = chunk[skipped:]
                    progress.advance(skipped)
                    if not chunk:
                        continue
                await self._publish_chunk(chunk)
                row += len(chunk)
                progress.advance(len(chunk), **self._progress_extra(fraction, progress))
                if self.checkpoints is not None and self.checkpoints.due():
                    await self.checkpoint()
        if row != self._rows_in_first_pass or self._winners_met != len(self._winners):
            raise CatalogueChangedError(
                f"the catalogue changed between its two reads ({self._rows_in_first_pass} "
                f"rows, then {row}); what was confirmed stays published, resume the run "
                "once the file stays put"
            )
        await self._flush_outgoing()
        if self.batches is not None:
            await self.batches.drain()
        progress.report(**self._progress_extra(fraction, progress))

    def _progress_extra(
        self, fraction: Callable[[], float | None], progress: Progress
    ) -> dict[str, Any]:
        elapsed_s = max(time.monotonic() - self._started_s, 1e-9)
        done = fraction()
        rate = (self.counts.jobs - self._jobs_at_start) / elapsed_s
        eta_s = progress.eta_s()
        self.metrics.publish_rate.set(rate)
        self.metrics.fraction_done.set(-1 if done is None else done)
        self.metrics.eta.set(-1 if eta_s is None else eta_s)
        return {
            "jobs": self.counts.jobs,
            "jobs_per_s": round(rate, 1),
            "rejected": self.counts.rejected,
            "fraction_done": None if done is None else round(done, 4),
        }

    async def checkpoint(self) -> None:
        assert self.checkpoints is not None
        await self._flush_outgoing()
        await self.checkpoints.write(**self.counts.checkpoint_fields())

    async def _flush_outgoing(self) -> None:
        if self._outgoing and self.batches is not None:
            await self.batches.submit(self._outgoing)
        self._outgoing = []

    def _candidates(
        self, chunk: list[CatalogueItem | RejectedRow], delta: PublishCounts
    ) -> tuple[list[CatalogueItem], list[RejectedRow], _Images]:
        """The chunk's items and rejects, and its images with which of them are new."""
        rejects: list[RejectedRow] = []
        rows: list[CatalogueItem] = []
        for entry in chunk:
            entry = _usable(entry)
            if isinstance(entry, RejectedRow):
                rejects.append(entry)
            else:
                rows.append(entry)
        items = self._winning(rows, rejects, delta)
        item_keys = [item_key(item.item_id) for item in items]
        rejects.sort(key=lambda reject: reject.line)
        for reject in rejects:
            if reject.item_id is None:
                delta.rejected_unattributed += 1
            else:
                self._rejected_keys.append(item_key(reject.item_id))
        item_of: list[int] = []
        image_ids: list[int] = []
        keys: list[int] = []
        versions: list[int] = []
        urls: list[str] = []
        for slot, item in enumerate(items):
            for position, url in enumerate(item.image_urls):
                item_of.append(slot)
                image_ids.append(image_id_for(item.item_id, str(position)))
                keys.append(position)
                versions.append(item.version)
                urls.append(url)
        fresh = self.builder.add(
            [i.item_id for i in items], item_of, image_ids, keys, versions, urls, item_keys
        )
        delta.rows += len(chunk)
        delta.items += len(items)
        delta.rejected += len(rejects)
        delta.duplicate_images += len(fresh) - int(fresh.sum())
        return items, rejects, _Images(item_of, image_ids, keys, fresh)

    def _winning(
        self, rows: list[CatalogueItem], rejects: list[RejectedRow], delta: PublishCounts
    ) -> list[CatalogueItem]:
        """The rows to publish (each item's winning row); the other rows of a repeated item
        are counted, or rejected when they contradict the winner."""
        w = self._winners
        if not len(w):
            return rows
        found = w.find(np.array([row_key(r.item_id) for r in rows], np.int64)).tolist()
        items: list[CatalogueItem] = []
        for row, at in zip(rows, found, strict=True):
            if at < 0 or row.line == int(w.lines[at]):
                if at >= 0:
                    self._winners_met += 1
                items.append(row)
            elif row.version < int(w.versions[at]):
                delta.superseded_rows += 1
            elif content_key(row.image_urls, row.etag) == int(w.contents[at]):
                delta.duplicate_images += len(row.image_urls)
            else:
                line = int(w.lines[at])
                reason = (
                    f"item {row.item_id[:200]!r}: version {row.version} is also at line "
                    f"{line} with other image URLs or etag; line {line} is used"
                )
                rejects.append(RejectedRow(row.line, reason, row.item_id[:200], row.item_id))
        return items

    def _remember(self, chunk: list[CatalogueItem | RejectedRow]) -> None:
        self._candidates(chunk, PublishCounts())

    async def _publish_chunk(self, chunk: list[CatalogueItem | RejectedRow]) -> None:
        delta = PublishCounts()
        items, rejects, images = self._candidates(chunk, delta)
        jobs: list[Job] = []
        new_images = np.flatnonzero(images.fresh).tolist()
        for index in new_images:
            image_id = images.image_ids[index]
            if self.already and upsert_job_id(self.run_id, image_id) in self.already:
                delta.already_published += 1
                continue
            item = items[images.item_of[index]]
            position = images.keys[index]
            jobs.append(
                upsert_job(
                    run_id=self.run_id,
                    image_id=image_id,
                    item_id=item.item_id,
                    image_key=str(position),
                    url=item.image_urls[position],
                    version=item.version,
                    lane=self.lane,
                    etag=item.etag,
                )
            )
        delta.jobs = len(new_images)
        await self._make_room(len(jobs))
        # Past the checkpoint decision: this chunk's effects may happen now.
        for reject in rejects:
            self._reject(reject)
        self.counts.add(delta)
        self._count(delta)
        if self.batches is None:
            return  # a dry run: counted, never sent
        self._outgoing.extend(jobs)
        while len(self._outgoing) >= self.batch_size:
            batch, self._outgoing = (
                self._outgoing[: self.batch_size],
                self._outgoing[self.batch_size :],
            )
            await self.batches.submit(batch)

    def _count(self, delta: PublishCounts) -> None:
        m = self.metrics
        m.rows.labels("item").inc(delta.items)
        m.rows.labels("rejected").inc(delta.rejected)
        m.jobs_skipped.labels("duplicate").inc(delta.duplicate_images)
        m.jobs_skipped.labels("already_published").inc(delta.already_published)

    async def _make_room(self, new_jobs: int) -> None:
        """Checkpoint first if this chunk's publishes could push the ledger past its bound."""
        if self.capacity_calls is None or self.batches is None or self.checkpoints is None:
            return
        needed = math.ceil((len(self._outgoing) + new_jobs) / self.batch_size) + 1
        if self.batches.calls_since_mark + needed <= self.capacity_calls:
            return
        await self.checkpoint()  # everything before this chunk; the ledger starts afresh
        needed = math.ceil(new_jobs / self.batch_size) + 1
        if needed > self.capacity_calls:
            raise ConfigError(
                f"the broker's publish ledger holds {self.capacity_calls} publishes of "
                f"{self.batch_size} jobs; {CHUNK_ROWS} catalogue rows need {needed}. Raise "
                "broker.rabbitmq.ledger_max_messages or lower producer.batch_size"
            )

    def _reject(self, row: RejectedRow) -> None:
        if len(self.rejects_kept) < MAX_REJECTS_KEPT:
            self.rejects_kept.append(row)
        self._rejects_logged += 1
        if self._rejects_logged <= MAX_REJECTS_LOGGED:
            # A few lines say what is wrong; the rest are counted (and in the rejects file).
            self.log.warning(
                "row rejected",
                line=row.line,
                reason=row.reason,
                more_not_logged=self._rejects_logged == MAX_REJECTS_LOGGED,
            )
        if self.rejects is not None:
            self.rejects.write(row)


async def publish_catalogue(
    broker: ProducerBroker,
    path: str | Path,
    run_id: str,
    *,
    lane: Lane = Lane.BULK,
    batch_size: int = 500,
    rejects_path: str | Path | None = None,
    in_flight: int = 4,
    metrics: ProducerMetrics | None = None,
) -> PublishReport:
    """Publish a catalogue file once, without run registration, checkpoints or deletes.

    ``metrics`` counts what was read and published (default: a registry nobody serves).
    """
    log = get_logger("producer", run_id=run_id, source=str(path))
    started_s = time.monotonic()
    counts = PublishCounts()
    metrics = metrics or ProducerMetrics()
    batches = ConfirmedBatches(
        broker, ledger=None, in_flight=in_flight, limiter=TokenBucket(0), metrics=metrics
    )
    rejects = RejectsFile(rejects_path) if rejects_path else None
    phase = UpsertPhase(
        run_id=run_id,
        lane=lane,
        batch_size=batch_size,
        builder=SnapshotBuilder(),
        counts=counts,
        batches=batches,
        metrics=metrics,
        rejects=rejects,
        log=log,
    )
    try:
        with open_catalogue(path) as catalogue:
            await phase.run(catalogue)
    finally:
        if rejects is not None:
            rejects.close()
    report = PublishReport.of(
        run_id,
        lane.value,
        counts,
        elapsed_s=time.monotonic() - started_s,
        rejects=phase.rejects_kept,
    )
    log.info("published", **report.as_dict())
    return report
