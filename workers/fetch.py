"""Fetch image bytes over http(s) or from file:// URLs, classifying every failure.

The fetcher never retries: a failure becomes a PermanentError or TransientError with a
stable reason code, and the broker's retry policy (jittered backoff, attempt limit) decides
what happens next. Retrying here as well would multiply attempts and hide load from ops.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from common.errors import ImgfleetError, PermanentError, Reason, TransientError

_CHUNK_BYTES = 64 * 1024
_USER_AGENT = "imgfleet-fetcher/1"


@dataclass
class FetchResult:
    data: bytes
    etag: str | None
    last_modified: str | None
    fetch_ms: float


def redact_url(url: str) -> str:
    """The URL without user:password@, safe to put in messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if "@" not in parts.netloc:
        return url
    host_port = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host_port))


def _scrub(text: str, url: str) -> str:
    """Remove the URL's userinfo from text a library produced (it may echo the URL)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return text
    userinfo = parts.netloc.rpartition("@")[0]
    text = text.replace(url, redact_url(url))
    for secret in {userinfo, urllib.parse.unquote(userinfo)}:
        if secret:
            text = text.replace(secret + "@", "")
    return text


def error_for_status(status: int, url: str) -> ImgfleetError | None:
    """The failure an HTTP status means, or None for success (2xx)."""
    if 200 <= status < 300:
        return None
    where = redact_url(url)
    if status in (404, 410):
        return PermanentError(f"HTTP {status} for {where}", Reason.HTTP_404)
    # 408 and 429 say "not now", not "never": the broker's backoff is the right answer.
    if status in (408, 429):
        return TransientError(f"HTTP {status} for {where}", Reason.HTTP_4XX)
    if status >= 500:
        return TransientError(f"HTTP {status} for {where}", Reason.HTTP_5XX)
    if 300 <= status < 400:
        # Only reached when redirects are disabled or the response has no usable Location.
        return PermanentError(f"HTTP {status} redirect not followed: {where}", Reason.HTTP_4XX)
    # Other 4xx (and stray 1xx) will not change on retry.
    return PermanentError(f"HTTP {status} for {where}", Reason.HTTP_4XX)


class Fetcher:
    """Async fetcher with one shared connection pool; use as `async with Fetcher() as f`."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        total_timeout_s: float = 30.0,
        max_bytes: int = 32 * 2**20,
        max_redirects: int = 5,
        per_host_limit: int = 16,
        total_limit: int = 64,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.per_host_limit = per_host_limit
        self.total_limit = total_limit
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(limit=self.total_limit, limit_per_host=self.per_host_limit)
        timeout = aiohttp.ClientTimeout(
            total=self.total_timeout_s,
            sock_connect=self.connect_timeout_s,
            sock_read=self.read_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def fetch(self, url: str) -> FetchResult:
        """Fetch url; raise PermanentError/TransientError with a reason code on failure."""
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError:
            raise PermanentError("unparseable URL", Reason.UNSUPPORTED_URL) from None
        started_s = time.perf_counter()
        if scheme in ("http", "https"):
            data, etag, last_modified = await self._fetch_http(url)
        elif scheme == "file":
            data, etag, last_modified = await asyncio.to_thread(self._read_file, url)
        else:
            raise PermanentError(
                f"unsupported URL scheme {scheme!r}: {redact_url(url)}", Reason.UNSUPPORTED_URL
            )
        fetch_ms = (time.perf_counter() - started_s) * 1000.0
        return FetchResult(data=data, etag=etag, last_modified=last_modified, fetch_ms=fetch_ms)

    async def _fetch_http(self, url: str) -> tuple[bytes, str | None, str | None]:
        if self._session is None:
            raise RuntimeError("Fetcher used outside 'async with'")
        where = redact_url(url)
        # aiohttp treats max_redirects=0 as "unlimited", so zero means not following at all.
        follow = self.max_redirects > 0
        # The exception chain is dropped (`from None`) because aiohttp's exceptions may carry
        # the URL with its credentials, and tracebacks get logged.
        try:
            async with self._session.get(
                url, allow_redirects=follow, max_redirects=max(self.max_redirects, 1)
            ) as resp:
                failure = error_for_status(resp.status, url)
                if failure is not None:
                    raise failure
                declared_bytes = resp.content_length
                if declared_bytes is not None and declared_bytes > self.max_bytes:
                    # close() rather than release(): draining a huge body to reuse the
                    # connection would cost exactly what this check is meant to save.
                    resp.close()
                    raise PermanentError(
                        f"Content-Length {declared_bytes} > max {self.max_bytes} bytes: {where}",
                        Reason.TOO_LARGE,
                    )
                data = await self._read_capped(resp, where)
                return data, resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        except ImgfleetError:
            raise
        except aiohttp.TooManyRedirects:
            raise PermanentError(
                f"too many redirects (more than {self.max_redirects}): {where}", Reason.HTTP_4XX
            ) from None
        except (aiohttp.InvalidURL, aiohttp.RedirectClientError, ValueError) as exc:
            # Malformed URLs, and redirects to non-http schemes or malformed Locations.
            raise PermanentError(
                f"invalid URL ({type(exc).__name__}: {_scrub(str(exc), url)}): {where}",
                Reason.UNSUPPORTED_URL,
            ) from None
        except TimeoutError as exc:
            # aiohttp's connect/read timeouts subclass TimeoutError, so this also covers them.
            raise TransientError(
                f"timed out ({type(exc).__name__}): {where}", Reason.TIMEOUT
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Refused, reset, DNS failure, TLS failure, body cut short (ClientPayloadError).
            raise TransientError(
                f"connection failed ({type(exc).__name__}: {_scrub(str(exc), url)}): {where}",
                Reason.CONNECTION,
            ) from None

    async def _read_capped(self, resp: aiohttp.ClientResponse, where: str) -> bytes:
        buffer = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
            buffer += chunk
            if len(buffer) > self.max_bytes:
                resp.close()
                raise PermanentError(
                    f"body exceeds max {self.max_bytes} bytes: {where}", Reason.TOO_LARGE
                )
        return bytes(buffer)

    def _read_file(self, url: str) -> tuple[bytes, str | None, str | None]:
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
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        return data, None, last_modified
