"""s3:// fetches through boto3 against moto's S3 server on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.errors import JobFailure, Reason
from tests.conftest import s3_client
from tests.support.fetching import url_fetcher
from workers.fetch.s3 import S3Fetcher, parse_s3_url
from workers.fetch.types import FetchResult

PAYLOAD = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100
BUCKET = "catalogue-images"


@pytest.fixture(scope="module")
def endpoint(s3_endpoint: str) -> str:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="img/a b.png", Body=PAYLOAD)
    client.put_object(Bucket=BUCKET, Key="img/big.bin", Body=b"x" * 5000)
    return s3_endpoint


def s3(endpoint: str, **kwargs: Any) -> S3Fetcher:
    return S3Fetcher(
        endpoint_url=endpoint, access_key_id="test", secret_access_key="test", **kwargs
    )


def fetch(fetcher: S3Fetcher, url: str, **validators: Any) -> FetchResult:
    async def go() -> FetchResult:
        async with url_fetcher(s3=fetcher) as f:
            return await f.fetch(url, **validators)

    return asyncio.run(go())


def test_object_with_validators(endpoint: str) -> None:
    result = fetch(s3(endpoint), f"s3://{BUCKET}/img/a%20b.png")
    assert result.data == PAYLOAD
    assert result.etag and result.last_modified and "GMT" in result.last_modified
    assert not result.not_modified


def test_conditional_get_is_not_modified(endpoint: str) -> None:
    fetcher = s3(endpoint)
    first = fetch(fetcher, f"s3://{BUCKET}/img/a%20b.png")
    again = fetch(fetcher, f"s3://{BUCKET}/img/a%20b.png", etag=first.etag)
    assert again.not_modified and again.data == b""
    changed = fetch(fetcher, f"s3://{BUCKET}/img/a%20b.png", etag='"other"')
    assert not changed.not_modified and changed.data == PAYLOAD


@pytest.mark.parametrize(
    ("url", "reason", "transient"),
    [
        (f"s3://{BUCKET}/img/missing.png", Reason.HTTP_404, False),
        ("s3://no-such-bucket/a.png", Reason.HTTP_404, False),
        (f"s3://{BUCKET}/img/big.bin", Reason.TOO_LARGE, False),
    ],
)
def test_failures_are_classified(endpoint: str, url: str, reason: Reason, transient: bool) -> None:
    with pytest.raises(JobFailure) as info:
        fetch(s3(endpoint, max_bytes=4096), url)
    assert info.value.reason == reason and info.value.transient == transient
    assert "test" not in repr(s3(endpoint))  # keys never in the repr


def test_unreachable_endpoint_is_transient() -> None:
    fetcher = S3Fetcher(
        endpoint_url="http://127.0.0.1:9",
        access_key_id="k",
        secret_access_key="s",
        connect_timeout_s=0.5,
    )
    with pytest.raises(JobFailure) as info:
        fetch(fetcher, f"s3://{BUCKET}/a.png")
    assert info.value.transient


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b/k/x%2By.jpg") == ("b", "k/x+y.jpg")
    for bad in ("s3://bucket", "s3:///key", "http://b/k"):
        with pytest.raises(JobFailure) as info:
            parse_s3_url(bad)
        assert info.value.reason == Reason.UNSUPPORTED_URL
