"""The nightly run's registry over the index's run files.

``producers.nightly.run_record.RunRegistry`` is what the producer records a run through;
the run file itself belongs to the index (``index.runs``), which producers may not import.
This translation between the two records lives here, in the composition root.
"""

from __future__ import annotations

from common.storage.base import Storage
from index.runs import RUN_PUBLISHED, RunInfo, list_runs, read_run, run_key, write_run
from producers.nightly.run_record import RunRecord


class IndexRunRegistry:
    """``RunRegistry`` over ``index.runs``: one run file per run id."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def load(self, run_id: str) -> RunRecord | None:
        if not self.storage.exists(run_key(run_id)):
            return None
        return record_of(read_run(self.storage, run_id))

    def save(self, record: RunRecord) -> None:
        write_run(
            self.storage,
            RunInfo(
                run_id=record.run_id,
                source=record.source,
                expected_jobs=record.expected_jobs,
                started_at_s=record.started_at_s,
                catalogue=record.catalogue,
                state=record.state,
                published_jobs=record.published_jobs,
                deleted_jobs=record.deleted_jobs,
                rejected_rows=record.rejected_rows,
                duplicate_images=record.duplicate_images,
                finished_at_s=record.finished_at_s,
            ),
        )

    def last_published(self, catalogue: str, *, exclude_run_id: str) -> RunRecord | None:
        """The newest published run of ``catalogue`` that started before ``exclude_run_id``.

        A run resumed after a newer one published (yesterday's cut-off run, finished
        today) deletes what left the catalogue since the run before it, never what the
        newer run added: its dump is older than those items (``index.lineage``).
        """
        runs = list_runs(self.storage)
        mine = [r.started_at_s for r in runs if r.run_id == exclude_run_id]
        runs = [
            r
            for r in runs
            if r.catalogue == catalogue
            and r.state == RUN_PUBLISHED
            and r.run_id != exclude_run_id
            and (not mine or r.started_at_s < mine[0])
        ]
        return record_of(runs[-1]) if runs else None


def record_of(info: RunInfo) -> RunRecord:
    return RunRecord(
        run_id=info.run_id,
        source=info.source,
        catalogue=info.catalogue,
        state=info.state,
        started_at_s=info.started_at_s,
        expected_jobs=info.expected_jobs,
        published_jobs=info.published_jobs,
        deleted_jobs=info.deleted_jobs,
        rejected_rows=info.rejected_rows,
        duplicate_images=info.duplicate_images,
        finished_at_s=info.finished_at_s,
    )
