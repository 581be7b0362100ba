"""What the producer records about a nightly run, and the registry it records it through.

The run file itself belongs to the index (``index.runs``), which producers may not
import: the composition root hands in a ``RunRegistry`` that translates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

STATE_PUBLISHING = "publishing"  # jobs are going out; the expected count is not final
STATE_PUBLISHED = "published"  # every job is on the broker; expected_jobs is final


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    source: str
    catalogue: str
    state: str
    started_at_s: float
    expected_jobs: int = 0
    published_jobs: int = 0
    deleted_jobs: int = 0
    rejected_rows: int = 0
    duplicate_images: int = 0
    finished_at_s: float | None = None


class RunRegistry(Protocol):
    def load(self, run_id: str) -> RunRecord | None: ...

    def save(self, record: RunRecord) -> None:
        """Durably record the run (replacing what was recorded before)."""
        ...

    def last_published(self, catalogue: str, *, exclude_run_id: str) -> RunRecord | None:
        """The newest published run of ``catalogue`` that started before ``exclude_run_id``.

        Any other published run when ``exclude_run_id`` has no record yet. A resumed older
        run computes its deletes against the run before it, never against a newer one.
        """
        ...
