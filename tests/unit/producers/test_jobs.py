"""The one job builder: ids from (scope, image, op), every field as given, on the wire."""

from __future__ import annotations

import time
from typing import Any

from common.identity import image_id_for, job_id_for
from common.schema import Job, Lane, Op, decode_job
from producers.jobs import delete_job, upsert_job, upsert_job_id

IMAGE_ID = image_id_for("sku", "1")
FIELDS: dict[str, Any] = {"item_id": "sku", "image_key": "1", "created_at_s": 1.5}


def test_an_upsert_is_the_schema_job_with_a_run_scoped_id() -> None:
    given = {**FIELDS, "url": "http://x/1.jpg", "version": 3, "lane": Lane.BULK, "etag": '"e"'}
    job = upsert_job(run_id="night-1", image_id=IMAGE_ID, **given)
    expected = Job(job_id=job_id_for("night-1", IMAGE_ID, "upsert"), run_id="night-1", **given)
    assert job.to_bytes() == expected.to_bytes()
    assert job.job_id == upsert_job_id("night-1", IMAGE_ID)
    assert decode_job(job.to_bytes()) == job


def test_a_delete_is_a_tombstone_and_the_id_scope_can_differ_from_the_run() -> None:
    given = {**FIELDS, "version": 4, "lane": Lane.LIVE}
    job = delete_job(run_id="cms", image_id=IMAGE_ID, id_scope="cms:key", **given)
    expected = Job(
        job_id=job_id_for("cms:key", IMAGE_ID, "delete"), run_id="cms", op=Op.DELETE, **given
    )
    assert job.to_bytes() == expected.to_bytes()
    assert job.url is None and job.etag is None and job.history == ()


def test_created_at_defaults_to_now() -> None:
    before_s = time.time()
    job = delete_job(
        run_id="r", image_id=IMAGE_ID, item_id="sku", image_key="1", version=0, lane=Lane.BULK
    )
    assert before_s <= job.created_at_s <= time.time()
