"""The one place jobs are built: the nightly run's upserts and deletes, and the CMS's.

A job's id is ``job_id_for(scope, image_id, op)``. The scope is the run id for a nightly
run, so a resumed run publishes the same ids again, and the CMS request's idempotency
scope for the CMS, so a retried request does. Everything else a job carries is what the
caller says: which run it belongs to, its item, image key, URL, version and lane.
``created_at_s`` defaults to the time the job is built.
"""

from __future__ import annotations

import time

from common.identity import job_id_for
from common.schema import Job, Lane, Op


def upsert_job_id(scope: str, image_id: int) -> str:
    """The id ``upsert_job`` gives this image's upsert (to look it up before building it)."""
    return job_id_for(scope, image_id, Op.UPSERT.value)


def upsert_job(
    *,
    run_id: str,
    image_id: int,
    item_id: str,
    image_key: str,
    url: str,
    version: int,
    lane: Lane,
    etag: str | None = None,
    id_scope: str | None = None,
    created_at_s: float | None = None,
) -> Job:
    """Index (or re-index) one image; ``id_scope`` defaults to ``run_id``."""
    return Job(
        job_id=upsert_job_id(run_id if id_scope is None else id_scope, image_id),
        run_id=run_id,
        item_id=item_id,
        image_key=image_key,
        url=url,
        version=version,
        lane=lane,
        etag=etag,
        created_at_s=time.time() if created_at_s is None else created_at_s,
    )


def delete_job(
    *,
    run_id: str,
    image_id: int,
    item_id: str,
    image_key: str,
    version: int,
    lane: Lane,
    id_scope: str | None = None,
    created_at_s: float | None = None,
) -> Job:
    """A tombstone for one image at ``version``; ``id_scope`` defaults to ``run_id``."""
    return Job(
        job_id=job_id_for(run_id if id_scope is None else id_scope, image_id, Op.DELETE.value),
        run_id=run_id,
        item_id=item_id,
        image_key=image_key,
        op=Op.DELETE,
        version=version,
        lane=lane,
        created_at_s=time.time() if created_at_s is None else created_at_s,
    )
