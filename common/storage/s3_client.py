"""The one boto3 S3 client factory, for every S3 user: storage, s3:// images, models, catalogues.

Three config sections describe S3 clients (``[storage]``, ``[worker]``, ``[model]``); each
caller passes its section's values here. A parameter left empty (or None) keeps botocore's
own default: credentials from its chain (environment, profile, instance role), region
from the environment or profile, its default timeouts, retries and pool size.

Each client gets its own ``boto3`` session: creating clients on boto3's shared default
session is not thread-safe, and the s3:// fetcher builds its client on a worker thread
(``asyncio.to_thread``).

This module names no adapter, so ``workers`` and ``producers`` may import it; boto3 is
imported on the first call, so a process that never reaches S3 never loads it.
"""

from __future__ import annotations

from typing import Any

from common.config import StorageConfig


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


def s3_client_from_config(config: StorageConfig) -> Any:
    """The client ``[storage]`` describes: endpoint, credentials, retries, timeouts.

    Used for the index storage and for s3:// catalogues, which share its credentials.
    """
    return make_s3_client(
        endpoint_url=config.s3_endpoint_url,
        region=config.s3_region,
        access_key_id=config.s3_access_key_id.get_secret_value(),
        secret_access_key=config.s3_secret_access_key.get_secret_value(),
        connect_timeout_s=config.s3_timeout_s,
        read_timeout_s=config.s3_timeout_s,
        max_attempts=config.s3_max_attempts,
    )
