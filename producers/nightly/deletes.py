"""Delete jobs for images that disappeared since the last published run of a catalogue.

An image of the previous run's snapshot that the current run does not have (its item is
gone, or the item now lists fewer images) becomes an ``op=delete`` job of the current run,
at the version it was published with: a tombstone at an equal version wins over that
upsert (the later record wins), and never over a newer one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.errors import ExitCode, OperatorError
from common.schema import Job, Lane
from producers.jobs import delete_job
from producers.nightly.snapshot import ImageSnapshot


class MassDeleteError(OperatorError):
    """More images would be deleted than ``producer.max_delete_fraction`` allows."""

    exit_code = ExitCode.MASS_DELETE

    def __init__(
        self,
        run_id: str,
        deletes: int,
        previous: int,
        max_fraction: float,
        *,
        kept_items: int = 0,
        rejected_unattributed: int = 0,
    ) -> None:
        share = deletes / previous if previous else 1.0
        rejected = ""
        if kept_items or rejected_unattributed:
            # Rejected rows are never deletions; say what they did, apart from the count.
            rejected = (
                f" Not counted: {kept_items} items of rejected rows, kept as they were; "
                f"{rejected_unattributed} rejected rows name no item (see the rejects)."
            )
        super().__init__(
            f"run {run_id!r} would delete {deletes} of the previous run's {previous} images "
            f"({share:.1%}, more than producer.max_delete_fraction={max_fraction:.0%}); "
            f"a truncated catalogue?{rejected} Nothing was deleted. If the deletes are "
            f"right, resume with `--resume {run_id} --allow-mass-delete`; to publish "
            f"without deletes, `--resume {run_id} --no-deletes`"
        )
        self.deletes = deletes
        self.previous = previous


def check_delete_guard(
    run_id: str,
    deletes: int,
    previous: int,
    max_fraction: float,
    allow: bool,
    *,
    kept_items: int = 0,
    rejected_unattributed: int = 0,
) -> None:
    """Stop before ``deletes`` go out if too many; kept items are never among them."""
    if not allow and deletes > max_fraction * previous:
        raise MassDeleteError(
            run_id,
            deletes,
            previous,
            max_fraction,
            kept_items=kept_items,
            rejected_unattributed=rejected_unattributed,
        )


def delete_jobs(
    previous: ImageSnapshot,
    gone: np.ndarray,
    run_id: str,
    *,
    start: int = 0,
    batch_size: int = 500,
) -> Iterator[tuple[int, list[Job]]]:
    """Batches of delete jobs for ``previous``'s images at ``gone[start:]``.

    Yields (index in ``gone`` after the batch, batch), so a checkpoint can say how far
    the deletes went.
    """
    for begin in range(start, len(gone), batch_size):
        end = min(begin + batch_size, len(gone))
        batch = [
            delete_job(
                run_id=run_id,
                image_id=int(previous.image_ids[index]),
                item_id=previous.item_id(index),
                image_key=str(int(previous.image_keys[index])),
                version=int(previous.versions[index]),
                lane=Lane.BULK,
            )
            for index in gone[begin:end].tolist()
        ]
        yield end, batch
