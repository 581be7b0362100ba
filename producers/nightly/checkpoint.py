"""The resume point of a catalogue run, at ``runs/<run_id>/checkpoint.json``.

Written (whole, through ``Storage.put``: temp file + replace, or one S3 PUT) only while
no publish is in flight, so everything it counts is confirmed: the first
``rows_consumed`` catalogue rows are published, and so are the first
``deletes_confirmed`` delete jobs. What was confirmed after it is in the broker's publish
ledger, read back from ``ledger_position`` on resume.

``CheckpointWriter`` writes them: wait for every publish in flight, mark the ledger (its
position goes into the checkpoint; the ledger's bound counts from there), sync the
rejects file, save.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field, fields, replace
from typing import Any

import orjson

from common.brokers.base import ProducerBroker
from common.observability.metrics import ProducerMetrics
from common.storage.base import Storage
from producers.catalogue.rejects import RejectsFile
from producers.nightly.batches import ConfirmedBatches

PHASE_UPSERTS = "upserts"  # reading the catalogue, publishing its images
PHASE_DELETES = "deletes"  # catalogue done and its snapshot written; deletes going out
PHASE_PUBLISHED = "published"  # every job of the run is on the broker


def checkpoint_key(run_id: str) -> str:
    return f"runs/{run_id}/checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    phase: str = PHASE_UPSERTS
    lane: str = "bulk"
    catalogue: str = ""
    source: str = ""
    started_at_s: float = 0.0
    # Counted over the first rows_consumed rows, all of them published.
    rows_consumed: int = 0
    items: int = 0
    rejected: int = 0
    rejected_unattributed: int = 0
    duplicate_images: int = 0
    superseded_rows: int = 0
    # Items of rejected rows republished from the previous run's snapshot (after the rows;
    # the first kept_confirmed of those images are published).
    kept_items: int = 0
    kept_images: int = 0
    kept_confirmed: int = 0
    jobs_confirmed: int = 0
    # Deletes phase: which published run the deletes compare with, and how far they went.
    previous_run_id: str | None = None
    deletes_planned: int = 0
    deletes_confirmed: int = 0
    ledger_position: dict[str, int] = field(default_factory=dict)
    rejects_path: str | None = None
    rejects_bytes: int | None = None  # length of the rejects file at this point
    # Jobs of publishes that failed for good: the ledger may hold a copy the lane queue
    # never took (a message nacked by one of its two queues), so a resume sends them again.
    unconfirmed_job_ids: list[str] = field(default_factory=list)
    updated_at_s: float = 0.0

    def advanced(self, **changes: Any) -> Checkpoint:
        return replace(self, updated_at_s=time.time(), **changes)

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        raw = orjson.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def save_checkpoint(storage: Storage, checkpoint: Checkpoint) -> None:
    storage.put(checkpoint_key(checkpoint.run_id), checkpoint.to_bytes())


def load_checkpoint(storage: Storage, run_id: str) -> Checkpoint | None:
    key = checkpoint_key(run_id)
    if not storage.exists(key):
        return None
    return Checkpoint.from_bytes(storage.get(key))


@dataclass(eq=False)
class CheckpointWriter:
    """Writes resume points: flush, wait for every confirm, mark the ledger, save.

    ``current`` starts as the run's base checkpoint and is the last one saved."""

    storage: Storage
    broker: ProducerBroker
    ledger: str
    batches: ConfirmedBatches
    current: Checkpoint
    _: KW_ONLY
    interval_s: float
    metrics: ProducerMetrics
    rejects: RejectsFile | None = None
    on_saved: Callable[[Checkpoint], None] | None = None
    _last_s: float = field(default_factory=time.monotonic, init=False, repr=False)

    def due(self) -> bool:
        return time.monotonic() - self._last_s >= self.interval_s

    async def record_failed_publishes(self) -> None:
        """After a publish failed for good: keep the resume point, add its job ids.

        Nothing else changes (the rows and the ledger position still describe the last
        checkpoint); the other publishes in flight are waited for first.
        """
        await self.batches.settle()
        failed = self.batches.unconfirmed_job_ids
        if not failed:
            return
        known = self.current.unconfirmed_job_ids
        checkpoint = self.current.advanced(
            unconfirmed_job_ids=[*known, *(i for i in failed if i not in set(known))]
        )
        await asyncio.to_thread(save_checkpoint, self.storage, checkpoint)
        self.current = checkpoint

    async def write(self, **state: Any) -> Checkpoint:
        await self.batches.drain()
        position = await self.broker.ledger_mark(self.ledger)
        self.batches.calls_since_mark = 0
        if self.rejects is not None:
            state["rejects_path"] = str(self.rejects.path.resolve())
            state["rejects_bytes"] = self.rejects.sync()
        checkpoint = self.current.advanced(ledger_position=position, **state)
        await asyncio.to_thread(save_checkpoint, self.storage, checkpoint)
        self.current = checkpoint
        self._last_s = time.monotonic()
        self.metrics.checkpoints.inc()
        if self.on_saved is not None:
            await asyncio.to_thread(self.on_saved, checkpoint)
        return checkpoint
