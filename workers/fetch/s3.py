"""s3://bucket/key fetches through boto3 (S3, MinIO or any S3-compatible endpoint).

The endpoint and credentials come from configuration (``worker.s3_*``); without explicit
keys boto3's own chain (environment, instance profile) applies. The endpoint is chosen by
ops, not by the job, so the SSRF guard does not apply to it. boto3's own retries are off:
transient failures go back to the broker's backoff like every other fetch failure.

Bounds: Content-Length over the cap is refused before the body is read, and reading stops
one chunk past the cap; the boto3 client is built once and shared by every fetch (its
connection pool is ``max_pool_connections`` wide).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import threading
import time
import urllib.parse
from typing import Any

from common.config import WorkerConfig
from common.errors import PermanentError, Reason, TransientError
from common.storage.s3_client import make_s3_client
from workers.fetch.types import FetchResult

_CHUNK_BYTES = 256 * 1024


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    bucket, key = parts.netloc, urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme.lower() != "s3" or not bucket or not key:
        raise PermanentError(f"not an s3://bucket/key URL: {url}", Reason.UNSUPPORTED_URL)
    return bucket, key


_DEFAULTS = WorkerConfig()  # [worker]'s, as the HTTP fetcher takes them


class S3Fetcher:
    def __init__(
        self,
        *,
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        connect_timeout_s: float = _DEFAULTS.connect_timeout_s,
        read_timeout_s: float = _DEFAULTS.read_timeout_s,
        max_bytes: int = _DEFAULTS.max_download_bytes,
        max_connections: int = _DEFAULTS.fetch_per_host_limit,
    ) -> None:
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_bytes = max_bytes
        self.max_connections = max_connections
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the keys
        return f"S3Fetcher(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_s3_client(
                    endpoint_url=self.endpoint_url,
                    region=self.region or "us-east-1",
                    access_key_id=self._access_key_id,
                    secret_access_key=self._secret_access_key,
                    connect_timeout_s=self.connect_timeout_s,
                    read_timeout_s=self.read_timeout_s,
                    max_attempts=1,
                    max_pool_connections=self.max_connections,
                )
            return self._client

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        return await asyncio.to_thread(self.fetch_sync, url, etag, last_modified)

    def fetch_sync(
        self, url: str, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        started_s = time.perf_counter()
        bucket, key = parse_s3_url(url)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            kwargs["IfNoneMatch"] = etag
        if last_modified:
            parsed = email.utils.parsedate_to_datetime(last_modified)
            if parsed is not None:
                kwargs["IfModifiedSince"] = parsed
        try:
            response = self._get_client().get_object(**kwargs)
            body = response["Body"]
            try:
                declared = int(response.get("ContentLength") or 0)
                if declared > self.max_bytes:
                    raise PermanentError(
                        f"ContentLength {declared} > max {self.max_bytes} bytes: {url}",
                        Reason.TOO_LARGE,
                    )
                buffer = bytearray()
                while chunk := body.read(_CHUNK_BYTES):
                    buffer += chunk
                    if len(buffer) > self.max_bytes:
                        raise PermanentError(
                            f"object exceeds max {self.max_bytes} bytes: {url}", Reason.TOO_LARGE
                        )
            finally:
                body.close()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status == 304 or code in ("304", "NotModified"):
                return FetchResult(
                    b"",
                    etag,
                    last_modified,
                    (time.perf_counter() - started_s) * 1000.0,
                    not_modified=True,
                )
            raise _client_error(code, status, url) from None
        except NoCredentialsError:
            raise PermanentError(
                f"no S3 credentials configured (worker.s3_access_key_id): {url}",
                Reason.UNSUPPORTED_URL,
            ) from None
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise TransientError(
                f"S3 timed out ({type(exc).__name__}): {url}", Reason.TIMEOUT
            ) from None
        except BotoCoreError as exc:
            raise TransientError(
                f"S3 connection failed ({type(exc).__name__}): {url}", Reason.CONNECTION
            ) from None
        return FetchResult(
            bytes(buffer),
            response.get("ETag"),
            _http_date(response.get("LastModified")),
            (time.perf_counter() - started_s) * 1000.0,
        )


def _http_date(value: Any) -> str | None:
    if value is None:
        return None
    return email.utils.format_datetime(value.astimezone(datetime.UTC), usegmt=True)


def _client_error(code: str, status: int, url: str) -> PermanentError | TransientError:
    if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
        return PermanentError(f"S3 {code or status}: {url}", Reason.HTTP_404)
    if status >= 500 or code in (
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    ):
        return TransientError(f"S3 {code or status}: {url}", Reason.HTTP_5XX)
    if status == 429:
        return TransientError(f"S3 {code or status}: {url}", Reason.HTTP_429)
    if status == 408:
        return TransientError(f"S3 {code or status}: {url}", Reason.HTTP_4XX)
    return PermanentError(f"S3 {code or status}: {url}", Reason.HTTP_4XX)
