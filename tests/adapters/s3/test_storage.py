"""What only the S3 adapter does, against moto's S3 server on loopback through boto3.

Multipart transfers, errors of the bucket itself, the single-writer fallback for endpoints
without conditional writes, and the settings of the one boto3 client factory. The
behaviour every adapter shares is in ``tests/contract/test_storage_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import load_settings
from common.storage.s3 import S3Storage, StorageRejectedError
from common.storage.s3_client import make_s3_client
from imgfleet.factories import make_storage
from tests.support.storage import ACCESS_KEY, fresh_s3_storage, storage_client
from workers.fetch.s3 import S3Fetcher

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_storage(s3_endpoint: str) -> S3Storage:
    return fresh_s3_storage(s3_endpoint)


def test_no_local_path_and_no_credentials_in_the_repr(s3_storage: S3Storage) -> None:
    assert s3_storage.local_path("x") is None
    assert ACCESS_KEY not in repr(s3_storage)
    assert repr(s3_storage).startswith(f"S3Storage(s3://{s3_storage.bucket}/fleet/index/")


def test_large_object_goes_multipart_and_reads_back(s3_storage: S3Storage, tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(70 * 2**20)
    s3_storage.put("generations/000001/big.bin", data)
    assert s3_storage.get("generations/000001/big.bin") == data
    target = tmp_path / "big.bin"
    s3_storage.download_to("generations/000001/big.bin", target)
    assert target.read_bytes() == data


def test_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    storage = S3Storage(
        "no-such-bucket-here", storage_client(s3_endpoint, max_attempts=1), endpoint_url=s3_endpoint
    )
    with pytest.raises(StorageRejectedError, match="does not exist"):
        storage.put("x", b"y")


def test_without_conditional_writes_a_stale_token_is_still_refused(s3_endpoint: str) -> None:
    # The single-writer fallback compares, then puts: a stale token still loses.
    storage = fresh_s3_storage(s3_endpoint, conditional_writes=False)
    assert storage.put_if_match("manifest.json", b"v1", None) is True
    assert storage.put_if_match("manifest.json", b"again", None) is False
    _, token = storage.get_versioned("manifest.json")
    assert storage.put_if_match("manifest.json", b"v2", token) is True
    assert storage.put_if_match("manifest.json", b"v2-other", token) is False
    assert storage.get("manifest.json") == b"v2"


def test_the_storage_client_has_its_retries_and_timeouts(s3_endpoint: str) -> None:
    settings = load_settings(
        storage={
            "kind": "s3",
            "s3_bucket": "b",
            "s3_endpoint_url": s3_endpoint,
            "s3_region": "eu-west-1",
            "s3_max_attempts": 2,
            "s3_timeout_s": 7.0,
        }
    )
    storage = make_storage(settings)
    assert isinstance(storage, S3Storage)
    meta = storage._client.meta
    assert (meta.endpoint_url, meta.region_name) == (s3_endpoint, "eu-west-1")
    # botocore counts the first try too: two retries are three attempts.
    assert meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert (meta.config.connect_timeout, meta.config.read_timeout) == (7.0, 7.0)


def test_the_fetcher_client_settings(s3_endpoint: str) -> None:
    fetcher = S3Fetcher(
        endpoint_url=s3_endpoint, connect_timeout_s=2.0, read_timeout_s=9.0, max_connections=3
    )
    config = fetcher._get_client().meta.config
    # max_attempts=1, which botocore counts as retries: one retry, two attempts.
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert (config.connect_timeout, config.read_timeout) == (2.0, 9.0)
    assert config.max_pool_connections == 3
    assert fetcher._get_client().meta.region_name == "us-east-1"


def test_empty_settings_keep_botocores_defaults() -> None:
    import boto3

    # What the model download gets: endpoint and region only, the rest as boto3's own.
    built = make_s3_client(endpoint_url="", region="eu-central-1", access_key_id="")
    plain = boto3.session.Session().client("s3", region_name="eu-central-1")
    assert built.meta.endpoint_url == plain.meta.endpoint_url
    assert built.meta.region_name == "eu-central-1"
    for setting in ("retries", "connect_timeout", "read_timeout", "max_pool_connections"):
        assert getattr(built.meta.config, setting) == getattr(plain.meta.config, setting)
