"""The worker's fetcher: one fetcher per URL scheme a job may carry.

``UrlFetcher`` looks up the job URL's scheme in its map: http and https go to the
``HttpFetcher`` (SSRF guard, byte cap, redirects by hand), s3 to the ``S3Fetcher`` when one
is configured, file to the ``FileFetcher`` when file URLs are allowed (local runs). Any
other scheme, or one that is switched off, is a permanent ``unsupported_url`` failure.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
import urllib.parse
import urllib.request

from common.errors import PermanentError, Reason, TransientError
from workers.fetch.http import HttpFetcher, redact_url
from workers.fetch.types import Fetcher, FetchResult


class UrlFetcher:
    """Fetch by scheme; use as ``async with UrlFetcher(http, ...) as f`` (opens the pool)."""

    def __init__(
        self,
        http: HttpFetcher,
        *,
        s3: Fetcher | None = None,
        files: Fetcher | None = None,
    ) -> None:
        self._http = http
        self._by_scheme: dict[str, Fetcher] = {"http": http, "https": http}
        if s3 is not None:
            self._by_scheme["s3"] = s3
        if files is not None:
            self._by_scheme["file"] = files

    async def __aenter__(self) -> UrlFetcher:
        await self._http.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        """Fetch url; raise PermanentError/TransientError with a reason code on failure."""
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError:
            raise PermanentError("unparseable URL", Reason.UNSUPPORTED_URL) from None
        fetcher = self._by_scheme.get(scheme)
        if fetcher is None:
            raise PermanentError(
                f"unsupported URL scheme {scheme!r}: {redact_url(url)}", Reason.UNSUPPORTED_URL
            )
        return await fetcher.fetch(url, etag=etag, last_modified=last_modified)


class FileFetcher:
    """file:// URLs on this host, under the same byte cap; never conditional."""

    def __init__(self, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        started_s = time.perf_counter()
        data, modified = await asyncio.to_thread(self._read, url)
        return FetchResult(data, None, modified, (time.perf_counter() - started_s) * 1000.0)

    def _read(self, url: str) -> tuple[bytes, str]:
        parts = urllib.parse.urlsplit(url)
        where = redact_url(url)
        if parts.netloc not in ("", "localhost"):
            raise PermanentError(f"file:// URL with a remote host: {where}", Reason.UNSUPPORTED_URL)
        path = urllib.request.url2pathname(parts.path)
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size > self.max_bytes:
                    raise PermanentError(
                        f"file is {stat.st_size} bytes > max {self.max_bytes}: {where}",
                        Reason.TOO_LARGE,
                    )
                # Read one byte past the cap: the file may grow between fstat and read.
                data = handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise PermanentError(f"file not found: {where}", Reason.HTTP_404) from None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise PermanentError(
                f"cannot read file ({type(exc).__name__}): {where}", Reason.HTTP_4XX
            ) from None
        except OSError as exc:
            # EIO, stale NFS handles and the like can clear up; let the broker retry.
            raise TransientError(
                f"file read failed ({type(exc).__name__}: {exc.strerror}): {where}",
                Reason.CONNECTION,
            ) from None
        if len(data) > self.max_bytes:
            raise PermanentError(
                f"file exceeds max {self.max_bytes} bytes: {where}", Reason.TOO_LARGE
            )
        return data, email.utils.formatdate(stat.st_mtime, usegmt=True)
