"""S3-compatible object storage through boto3 (AWS S3, MinIO, moto's server).

Objects are written whole by one ``PutObject``: S3 never exposes a half-written object, so
the protocol's "whole or not at all" holds without temp keys. Large objects (shard files)
go through boto3's managed multipart upload, which also completes atomically, and
``download_to`` streams through its managed download. The boto3 client comes from
``common.storage.s3_client``, the one client factory.

``put_if_match`` is the compare-and-swap the index manifest needs: ``If-Match: <etag>`` to
replace the version that was read, ``If-None-Match: *`` to create. S3 (since 2024), MinIO
and moto honour both. With ``conditional_writes=False`` (an endpoint that rejects or
ignores them) it degrades to compare-then-put, which is only safe with a single writer;
the README says so.

Errors: a missing key is ``ObjectNotFoundError`` (permanent); throttling, 5xx and
connection failures, after botocore's own retries, are ``TransientError``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from common.errors import ConfigError, PermanentError, Reason, TransientError
from common.storage.base import ObjectNotFoundError, Versioned, check_key
from common.storage.cas import compare_then_put

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_MULTIPART_ABOVE_BYTES = 64 * 2**20
_PRECONDITION_CODES = {"412", "PreconditionFailed", "ConditionalRequestConflict", "409"}


class StorageUnavailableError(TransientError):
    reason = Reason.STORAGE


class StorageRejectedError(PermanentError):
    reason = Reason.STORAGE


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage:
    """One bucket, keys under an optional prefix, through ``client`` (a boto3 S3 client:
    ``imgfleet.factories.storage_s3_client`` makes it from ``[storage]`` over ``[s3]``,
    with its retries and timeouts). ``endpoint_url`` is only shown, in the repr."""

    def __init__(
        self,
        bucket: str,
        client: Any,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        conditional_writes: bool = True,
    ) -> None:
        if not bucket:
            raise ConfigError("storage.s3_bucket is required for storage.kind='s3'")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or None
        self.conditional_writes = conditional_writes
        self._client = client

    def __repr__(self) -> str:
        # Never the credentials.
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage(s3://{self.bucket}/{self.prefix}{where})"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, exc: Exception, action: str, key: str) -> Exception:
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code in _NOT_FOUND_CODES:
                return ObjectNotFoundError(f"no object {key!r} in {self!r}")
            if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                return StorageRejectedError(f"{action} {key!r} refused by {self!r}: {code}")
            if code == "NoSuchBucket":
                return StorageRejectedError(f"bucket {self.bucket!r} does not exist")
        return StorageUnavailableError(f"{action} {key!r} on {self!r} failed: {exc}")

    # --- Storage protocol ---------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        try:
            if len(data) > _MULTIPART_ABOVE_BYTES:
                # Multipart: parallel parts, and past PutObject's 5 GB limit; the object
                # still appears only when the upload completes.
                self._client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key))
            else:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "put", key) from exc

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body: bytes = response["Body"].read()
            return body
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "get", key) from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return False
            raise self._fail(exc, "head", key) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, "head", key) from exc

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for entry in page.get("Contents", []):
                    keys.append(entry["Key"][len(self.prefix) :])
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "list", prefix or "/") from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "delete", key) from exc

    def local_path(self, key: str) -> Path | None:
        return None

    def download_to(self, key: str, path: Path) -> None:
        """Stream an object into a file (shard vectors are too big to hold as bytes)."""
        try:
            self._client.download_file(self.bucket, self._key(key), os.fspath(path))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "download", key) from exc

    def get_versioned(self, key: str) -> Versioned:
        """(bytes, ETag), or (None, None) if there is no such object."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return Versioned(response["Body"].read(), str(response["ETag"]))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return Versioned(None, None)
            raise self._fail(exc, "get", key) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, "get", key) from exc

    def put_if_match(self, key: str, data: bytes, expected_token: str | None) -> bool:
        """Write if the object still has ETag ``expected_token`` (None: if it does not exist).

        False when another writer got there first.
        """
        if not self.conditional_writes:
            # Documented fallback: not atomic, safe only with one writer at a time.
            return compare_then_put(self, key, data, expected_token)
        condition = {"IfNoneMatch": "*"} if expected_token is None else {"IfMatch": expected_token}
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except ClientError as exc:
            code = _code(exc)
            if code in _PRECONDITION_CODES:
                return False
            if expected_token is not None and code in _NOT_FOUND_CODES:
                return False  # deleted since we read it
            raise self._fail(exc, "conditional put", key) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, "conditional put", key) from exc
