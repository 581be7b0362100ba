"""A rejected row never deletes: its item is kept as the last published run had it.

A nightly generation holds only what its run mentions, so an item the run leaves out is
gone from it, delete job or not (a row rejected for ``"version": "2.0"`` took its item
out of the index). A rejected row that names its item (``RejectedRow.item_id``) therefore
keeps that item when no other row of the run publishes it: the item's images are
published again from the previous run's snapshot (same key, URL and version; the fetcher
finds them unchanged and reuses their vectors), and they go into this run's snapshot, so
they are not deleted now and the next run still knows them. A rejected row without a
readable item id (not JSON, a ragged CSV row) cannot keep anything; the run counts those
apart (``rejected_unattributed``) so a mass of them is seen beside the deletes.

Images of a format 1 snapshot (written by an older version) have no URL: they are kept in
the snapshot, so not deleted, but cannot be republished and leave the next generation; the
run logs how many.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.schema import Job, Lane
from producers.jobs import upsert_job
from producers.nightly.snapshot import ImageSnapshot, SnapshotBuilder


def kept_images(
    previous: ImageSnapshot, rejected_items: np.ndarray, published_items: np.ndarray
) -> np.ndarray:
    """Indexes (sorted order) of ``previous``'s images to keep: their item (by key) has a
    rejected row in this run and no published one. Ordered by item, then image key, so an
    item's images are side by side (and the order is the same on resume)."""
    wanted = np.setdiff1d(np.asarray(rejected_items, np.int64), published_items)
    if len(wanted) == 0 or len(previous) == 0:
        return np.zeros(0, np.int64)
    kept = np.flatnonzero(np.isin(previous.item_keys_of_images(), wanted))
    order = np.lexsort((previous.image_keys[kept], previous.item_rows[kept]))
    by_item: np.ndarray = kept[order]
    return by_item


def kept_item_count(previous: ImageSnapshot, kept: np.ndarray) -> int:
    return len(np.unique(previous.item_keys_of_images()[kept]))


def kept_batches(
    previous: ImageSnapshot,
    kept: np.ndarray,
    builder: SnapshotBuilder,
    *,
    run_id: str,
    lane: Lane = Lane.BULK,
    batch_size: int = 500,
) -> Iterator[tuple[int, list[Job]]]:
    """Add the kept images to ``builder`` and yield their upsert jobs in batches.

    Yields (index in ``kept`` after the batch, its jobs) for every batch from the first,
    so a resumed run adds them all again and can skip sending what a checkpoint says went
    out. A batch holds whole items (``kept`` is ordered by item), up to ``batch_size``
    images unless one item has more. An image without a URL is added but has no job.
    """
    rows_of = previous.item_rows[kept]
    # Where each item's images start in ``kept``, and the end.
    item_starts = np.flatnonzero(np.concatenate(([True], rows_of[1:] != rows_of[:-1])))
    bounds = [*item_starts.tolist(), len(kept)]
    begin, b = 0, 0
    while begin < len(kept):
        end_b = b + 1
        while end_b + 1 < len(bounds) and bounds[end_b + 1] - begin <= batch_size:
            end_b += 1
        end = bounds[end_b]
        at = kept[begin:end]
        urls = previous.urls_at(at)
        rows = previous.item_rows[at]
        item_rows, item_of = np.unique(rows, return_inverse=True)
        item_ids = [previous.item_id_at_row(int(row)) for row in item_rows.tolist()]
        item_keys = previous.item_keys_by_row()[item_rows].tolist()
        image_ids = previous.image_ids[at].tolist()
        keys = previous.image_keys[at].tolist()
        versions = previous.versions[at].tolist()
        fresh = builder.add(
            item_ids,
            item_of.tolist(),
            image_ids,
            keys,
            versions,
            [url or "" for url in urls],
            item_keys,
        )
        jobs = [
            upsert_job(
                run_id=run_id,
                image_id=image_ids[i],
                item_id=item_ids[int(item_of[i])],
                image_key=str(keys[i]),
                url=url,
                version=versions[i],
                lane=lane,
            )
            for i, url in enumerate(urls)
            if url and fresh[i]
        ]
        yield end, jobs
        begin, b = end, end_b
