"""The one boto3 S3 client factory, for every S3 user: storage, s3:// images, models, catalogues.

``[s3]`` holds the endpoint and credentials they share and ``[storage]``, ``[worker]`` and
``[model]`` override them per use; ``imgfleet.factories`` resolves which values a use gets
and passes them here. A parameter left empty (or None) keeps botocore's
own default: credentials from its chain (environment, profile, instance role), region
from the environment or profile, its default timeouts, retries and pool size.

Each client gets its own ``boto3`` session: creating clients on boto3's shared default
session is not thread-safe, and the s3:// fetcher builds its client on a worker thread
(``asyncio.to_thread``).

This module names no adapter, so ``workers`` and ``producers`` may import it; boto3 is
imported on the first call, so a process that never reaches S3 never loads it.
"""

from __future__ import annotations

from typing import Any, TypedDict


class S3Endpoint(TypedDict):
    """Where one use of S3 goes and as whom (empty: boto3's default)."""

    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    connect_timeout_s: float | None = None,
    read_timeout_s: float | None = None,
    max_attempts: int | None = None,
    max_pool_connections: int | None = None,
) -> Any:
    """A boto3 S3 client; ``max_attempts`` is botocore's retry count in standard mode."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {}
    if connect_timeout_s is not None:
        options["connect_timeout"] = connect_timeout_s
    if read_timeout_s is not None:
        options["read_timeout"] = read_timeout_s
    if max_attempts is not None:
        options["retries"] = {"max_attempts": max_attempts, "mode": "standard"}
    if max_pool_connections is not None:
        options["max_pool_connections"] = max_pool_connections
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or None,
        aws_access_key_id=access_key_id or None,
        aws_secret_access_key=secret_access_key or None,
        config=Config(**options),
    )
