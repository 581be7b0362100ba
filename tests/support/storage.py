"""Storage adapters for tests: a fresh bucket on the moto endpoint (``s3_endpoint``)."""

from __future__ import annotations

import uuid
from typing import Any

from common.storage.s3 import S3Storage
from common.storage.s3_client import make_s3_client
from tests.conftest import s3_client

# moto accepts any credentials; tests check that these never show in a repr.
ACCESS_KEY = "testing"


def storage_client(endpoint: str, **options: Any) -> Any:
    """A storage-style client for the moto server (``options``: retries, timeouts)."""
    return make_s3_client(
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id=ACCESS_KEY,
        secret_access_key=ACCESS_KEY,
        **options,
    )


def fresh_s3_storage(endpoint: str, *, prefix: str = "fleet/index", **kwargs: Any) -> S3Storage:
    """An ``S3Storage`` on a new, empty bucket of the moto server at ``endpoint``."""
    bucket = f"imgfleet-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return S3Storage(
        bucket, storage_client(endpoint), prefix=prefix, endpoint_url=endpoint, **kwargs
    )
