"""Byte streams for catalogue files: local paths and s3://bucket/key, gzip or plain.

Streaming formats (JSONL, CSV) read one pass front to back: a local file, or one GetObject
body that is never downloaded whole. A connection that drops mid-body is resumed at the
byte it reached (``Range`` + ``If-Match``), so a multi-GB nightly dump survives a reset.
Gzip is recognised by its magic bytes, whatever the name says.

Parquet needs a seekable file (the footer is at the end, row groups are read by offset):
``S3RangeReader`` is a read-only seekable file over ranged GetObject requests with a small
block cache, so a row-group read costs a few requests and memory stays bounded.

Every failure to reach the catalogue is raised as one of the errors below with a message
that names the source; nothing from botocore or the OS escapes bare.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from common.errors import ConfigError, ExitCode, OperatorError

STREAM_BUFFER_BYTES = 1 * 2**20  # one read from the file / socket
RANGE_BLOCK_BYTES = 4 * 2**20  # one ranged GET for Parquet
RANGE_CACHE_BLOCKS = 4  # blocks kept: one per column chunk being read, roughly
MAX_RESUMES = 5  # a streamed body reconnects at most this many times in a row

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_CHANGED_CODES = {"412", "PreconditionFailed"}
_GZIP_MAGIC = b"\x1f\x8b"


class CatalogueError(OperatorError):
    """The catalogue as a whole cannot be read; the run stops with this message (exit 1).

    ``transient`` says whether running again later may work (storage did not answer) or
    not before the catalogue or its access is fixed (missing, denied, not its format).
    """

    exit_code = ExitCode.FAILED
    transient = False


class CatalogueNotFoundError(CatalogueError):
    pass


class CatalogueAccessError(CatalogueError):
    pass


class CatalogueFormatError(CatalogueError, ValueError):
    """Not the format it claims (bad Parquet footer, no CSV header, missing columns...)."""


class CatalogueChangedError(CatalogueError):
    """The object was replaced while it was being read: rows would mix two dumps."""


class CatalogueUnavailableError(CatalogueError):
    """Storage did not answer (after botocore's retries); trying the run later may work.

    Nothing retries it in the process: the S3 readers already resumed what they could.
    """

    transient = True


def is_s3_url(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and source.startswith("s3://")


def given_s3_client(client: Any | None, source: str) -> Any:
    """The S3 client an s3:// source is read with; the caller makes it from its settings
    (``imgfleet.factories.open_catalogue``: ``[storage]``'s over ``[s3]``)."""
    if client is None:
        raise ConfigError(f"catalogue {source}: an s3:// catalogue needs an S3 client")
    return client


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"not an S3 object URL (want s3://bucket/key): {url!r}")
    return bucket, key


def _client_error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _s3_failure(exc: Exception, url: str, action: str) -> Exception:
    """Map a boto3 failure to one of our errors, naming the object."""
    if isinstance(exc, ClientError):
        code = _client_error_code(exc)
        if code in _NOT_FOUND_CODES:
            return CatalogueNotFoundError(f"catalogue {url} not found (no such object)")
        if code == "NoSuchBucket":
            return CatalogueNotFoundError(f"catalogue {url}: bucket does not exist")
        if code in _DENIED_CODES:
            return CatalogueAccessError(f"catalogue {url}: access denied ({code})")
        if code in _CHANGED_CODES:
            return CatalogueChangedError(
                f"catalogue {url} was replaced while it was being read; run again"
            )
        if code == "InvalidRange":
            return CatalogueChangedError(f"catalogue {url} shrank while it was being read")
    if isinstance(exc, NoCredentialsError):
        return CatalogueAccessError(f"catalogue {url}: no S3 credentials configured")
    return CatalogueUnavailableError(f"catalogue {url}: {action} failed: {exc}")


# --- sequential streams ---------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts the bytes handed up, so progress is measured on the stored (compressed) size."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n: int = self._inner.readinto(buffer) or 0
        self.bytes_read += n
        return n

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


class S3StreamReader(io.RawIOBase):
    """One object's body, front to back; a dropped connection resumes where it stopped."""

    def __init__(self, client: Any, url: str, *, max_resumes: int = MAX_RESUMES) -> None:
        self._client = client
        self.url = url
        self._bucket, self._key = parse_s3_url(url)
        self._max_resumes = max_resumes
        self._pos = 0
        response = self._get()
        self.size_bytes: int = int(response["ContentLength"])
        # A resumed read must continue the same object, never a newer one.
        self.etag: str | None = response.get("ETag")
        self._body: Any = response["Body"]

    def _get(self, start: int = 0) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if start:
            kwargs["Range"] = f"bytes={start}-"
            if self.etag:
                kwargs["IfMatch"] = self.etag
        try:
            return self._client.get_object(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_failure(exc, self.url, "GetObject") from exc

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size_bytes - self._pos)
        if want <= 0:
            return 0
        failures = 0
        while True:
            try:
                data: bytes = self._body.read(want)
                if not data:
                    # The body ended before Content-Length: as good as a reset.
                    raise ConnectionError("body ended early")
                break
            except (BotoCoreError, OSError) as exc:
                failures += 1
                if failures > self._max_resumes:
                    raise CatalogueUnavailableError(
                        f"catalogue {self.url}: reading failed at byte {self._pos} "
                        f"after {self._max_resumes} reconnects: {exc}"
                    ) from exc
                self._body.close()
                self._body = self._get(self._pos)["Body"]
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


@dataclass
class ByteStream:
    """A catalogue's bytes, decompressed, with progress measured on the stored bytes."""

    stream: IO[bytes]
    size_bytes: int | None
    compressed: bool
    _counter: _CountingReader

    def bytes_read(self) -> int:
        return self._counter.bytes_read

    def close(self) -> None:
        self.stream.close()
        self._counter.close()


def open_local_file(path: Path) -> tuple[Any, int]:
    """An unbuffered file and its size; a missing or unreadable file is a clear error."""
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the ByteStream
    except FileNotFoundError as exc:
        raise CatalogueNotFoundError(f"catalogue {path} not found") from exc
    except IsADirectoryError as exc:
        raise CatalogueNotFoundError(f"catalogue {path} is a directory, not a file") from exc
    except PermissionError as exc:
        raise CatalogueAccessError(f"catalogue {path}: permission denied") from exc
    except OSError as exc:
        raise CatalogueError(f"catalogue {path} cannot be opened: {exc}") from exc
    return fh, os.fstat(fh.fileno()).st_size


def open_byte_stream(source: str | os.PathLike[str], *, s3_client: Any | None = None) -> ByteStream:
    """Open a local file or s3:// object for one sequential pass; gunzip when gzipped."""
    if is_s3_url(source):
        client = given_s3_client(s3_client, str(source))
        raw: Any = S3StreamReader(client, str(source))
        size: int = raw.size_bytes
    else:
        raw, size = open_local_file(Path(source))
    counter = _CountingReader(raw)
    buffered = io.BufferedReader(counter, buffer_size=STREAM_BUFFER_BYTES)
    try:
        compressed = buffered.peek(2)[:2] == _GZIP_MAGIC
    except Exception:
        buffered.close()
        raise
    if not compressed and str(source).lower().endswith(".gz"):
        buffered.close()
        # A 0-byte .gz used to read as an empty plain file (0 rows, exit 0), where a
        # truncated one stops the run: every broken gzip is an error.
        raise CatalogueFormatError(
            f"catalogue {source} is named .gz but is not a gzip file"
            + (" (it is empty)" if size == 0 else "")
        )
    stream: IO[bytes] = buffered
    if compressed:
        stream = io.BufferedReader(
            _GunzipReader(buffered, str(source)), buffer_size=STREAM_BUFFER_BYTES
        )
    return ByteStream(stream, size, compressed, counter)


class _GunzipReader(io.RawIOBase):
    """gunzip on the fly; a truncated or corrupt archive is a clear error, not zlib's."""

    def __init__(self, compressed: IO[bytes], source: str) -> None:
        self._compressed = compressed
        self._gzip = gzip.GzipFile(fileobj=compressed, mode="rb")
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            # read1: hand up what is decompressed so far, so the rows before a truncation
            # are read before the error.
            data = self._gzip.read1(len(buffer))
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise CatalogueFormatError(
                f"catalogue {self._source} is a truncated or corrupt gzip file: {exc}"
            ) from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._gzip.close()
            finally:
                self._compressed.close()
        super().close()


# --- seekable ranged reads (Parquet) ------------------------------------------------------


class S3RangeReader(io.RawIOBase):
    """A read-only seekable file over ranged GetObject requests.

    Reads are served from an LRU of ``block_bytes``-aligned blocks, so the many small reads
    a Parquet reader makes (footer, page headers, buffered column streams) cost one request
    per block; a read at least a block long is fetched directly and not cached. Every
    request carries ``If-Match`` with the ETag seen at open: a replaced object is an error,
    never a mix of two files.
    """

    def __init__(
        self,
        client: Any,
        url: str,
        *,
        block_bytes: int = RANGE_BLOCK_BYTES,
        cache_blocks: int = RANGE_CACHE_BLOCKS,
    ) -> None:
        self._client = client
        self.url = url
        self._bucket, self._key = parse_s3_url(url)
        self._block_bytes = block_bytes
        self._cache_blocks = max(1, cache_blocks)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self.requests = 0  # ranged GETs made, for tests and logs
        try:
            head = client.head_object(Bucket=self._bucket, Key=self._key)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_failure(exc, url, "HeadObject") from exc
        self.size_bytes: int = int(head["ContentLength"])
        self.etag: str | None = head.get("ETag")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size_bytes + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def size(self) -> int:
        return self.size_bytes

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) in one request."""
        kwargs: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if self.etag:
            kwargs["IfMatch"] = self.etag
        self.requests += 1
        try:
            data: bytes = self._client.get_object(**kwargs)["Body"].read()
        except (ClientError, BotoCoreError, OSError) as exc:
            raise _s3_failure(exc, self.url, f"ranged GetObject {start}-{end - 1}") from exc
        if len(data) != end - start:
            raise CatalogueChangedError(
                f"catalogue {self.url}: asked for {end - start} bytes at {start}, "
                f"got {len(data)}; the object changed while it was being read"
            )
        return data

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        start = index * self._block_bytes
        block = self._fetch(start, min(start + self._block_bytes, self.size_bytes))
        self._blocks[index] = block
        if len(self._blocks) > self._cache_blocks:
            self._blocks.popitem(last=False)
        return block

    def read(self, size: int | None = -1) -> bytes:
        start = self._pos
        end = self.size_bytes if size is None or size < 0 else min(start + size, self.size_bytes)
        if end <= start:
            return b""
        if end - start >= self._block_bytes:
            data = self._fetch(start, end)
        else:
            parts = []
            pos = start
            while pos < end:
                index, offset = divmod(pos, self._block_bytes)
                block = self._block(index)
                chunk = block[offset : offset + (end - pos)]
                parts.append(chunk)
                pos += len(chunk)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._blocks.clear()
        super().close()
