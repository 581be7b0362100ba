"""Segment records for tests that stand in for the workers: one record per job, as a
worker writes it once the job is done (a tombstone for a delete)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from common.schema import Job
from common.storage.base import Storage
from index.segments import SegmentWriter, VectorRecord


def write_job_records(
    storage: Storage,
    n_shards: int,
    writer_id: str,
    jobs: Iterable[Job],
    vector_of: Callable[[Job], np.ndarray | None],
) -> None:
    """One record per job, its vector ``vector_of(job)`` (None: a tombstone); one flush."""
    writer = SegmentWriter(storage, n_shards, writer_id)
    for job in jobs:
        writer.add(
            VectorRecord(
                image_id=job.image_id,
                item_id=job.item_id,
                version=job.version,
                content_hash="h",
                model_id="stand-in",
                vector=vector_of(job),
                run_id=job.run_id,
            )
        )
    writer.flush()
