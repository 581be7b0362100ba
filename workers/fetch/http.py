"""Fetch image bytes over http(s)://, classifying every failure.

Safety and bounds, whatever the origin does:
- every address is checked by the SSRF guard (``url_guard``): IP literals before each
  request and redirect hop, names after resolution, at connect time;
- redirects are followed by hand, at most ``max_redirects`` hops, each hop re-checked;
- ``total_timeout_s`` bounds the whole fetch (redirects and a slow-drip body included),
  ``connect_timeout_s`` and ``read_timeout_s`` each socket wait;
- the body is capped at ``max_bytes``: refused early on Content-Length, and reading stops
  past the cap; a compressed body (``Content-Encoding: gzip``) is inflated in bounded
  steps against the same cap, so a gzip bomb costs at most ``max_bytes`` of memory.

Retries: connection-level failures (reset, refused, body cut short, mostly a stale pooled
keep-alive connection) are retried here ``retries`` times with a short jittered backoff.
HTTP 5xx / 429 and timeouts are not: they mean the origin is struggling, and the broker's
retry policy (jittered exponential backoff over minutes, attempt limit, DLQ) is the right
answer; retrying here as well would multiply attempts and hide load from ops.

Retry-After: a 429 or 503 that carries one (seconds or an HTTP-date) makes the job's retry
wait at least that long (capped at ``retry_after_max_s``), and holds the origin off in this
fetcher for as long (``retry_after.HostHolds``): a job for a held origin is handed back
for the end of the hold without a request and without using up an attempt.

Conditional requests: given the ETag / Last-Modified an image had when it was last
indexed, ``fetch`` sends If-None-Match / If-Modified-Since and reports a 304 as
``not_modified`` with no body.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field
from types import TracebackType

import aiohttp

from common.config import BrokerConfig, WorkerConfig
from common.errors import JobFailure, PermanentError, Reason, TransientError
from workers.fetch.retry_after import HostHolds, hold_s, origin_of
from workers.fetch.types import FetchResult
from workers.fetch.url_guard import AddressPolicy, GuardedResolver

_CHUNK_BYTES = 64 * 1024
_USER_AGENT = "imgfleet-fetcher/1"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Defaults are the configuration's (worker.*), so a fetcher built without settings (tests,
# benchmarks) behaves like an unconfigured worker's.
_DEFAULTS = WorkerConfig()
_RETRY_DEFAULTS = BrokerConfig()


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


def error_for_status(
    status: int, url: str, *, retry_after_s: float | None = None
) -> JobFailure | None:
    """The failure an HTTP status means, or None for success (2xx).

    ``retry_after_s``: the (capped) wait a 429 or 503 asked for; the retry waits as long.
    """
    if 200 <= status < 300:
        return None
    where = redact_url(url)
    asked = "" if retry_after_s is None else f" (Retry-After {retry_after_s:g} s)"
    if status in (404, 410):
        return PermanentError(f"HTTP {status} for {where}", Reason.HTTP_404)
    # 408 and 429 say "not now", not "never": the broker's backoff is the right answer.
    # 429 has its own reason so that a host that keeps rate-limiting shows as such.
    if status == 429:
        return TransientError(
            f"HTTP 429 for {where}{asked}", Reason.HTTP_429, retry_after_s=retry_after_s
        )
    if status == 408:
        return TransientError(f"HTTP {status} for {where}", Reason.HTTP_4XX)
    if status >= 500:
        return TransientError(
            f"HTTP {status} for {where}{asked}", Reason.HTTP_5XX, retry_after_s=retry_after_s
        )
    if 300 <= status < 400:
        # Only reached when redirects are disabled or the response has no usable Location.
        return PermanentError(f"HTTP {status} redirect not followed: {where}", Reason.HTTP_4XX)
    # Other 4xx (and stray 1xx) will not change on retry.
    return PermanentError(f"HTTP {status} for {where}", Reason.HTTP_4XX)


class _BoundedInflater:
    """Inflates gzip / deflate bodies chunk by chunk, never past ``max_bytes``."""

    def __init__(self, encoding: str, max_bytes: int, where: str) -> None:
        # 16 + MAX_WBITS: gzip header; MAX_WBITS: zlib; the deflate fallback is raw deflate.
        wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._inflater_wbits = wbits
        self._inflater = zlib.decompressobj(wbits)
        self._raw_fallback = encoding == "deflate"
        self._max_bytes = max_bytes
        self._where = where
        self.total = 0

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        pending = chunk
        while pending:
            room = self._max_bytes - self.total - len(out) + 1
            try:
                piece = self._inflater.decompress(pending, room)
            except zlib.error as exc:
                if self._raw_fallback and self.total == 0 and not out:
                    # Some servers send raw deflate under "deflate"; retry that way once.
                    self._inflater_wbits = -zlib.MAX_WBITS
                    self._inflater = zlib.decompressobj(self._inflater_wbits)
                    self._raw_fallback = False
                    continue
                raise PermanentError(
                    f"compressed body is corrupt ({exc}): {self._where}", Reason.UNDECODABLE
                ) from None
            out += piece
            if self.total + len(out) > self._max_bytes:
                raise PermanentError(
                    f"compressed body inflates past max {self._max_bytes} bytes "
                    f"(a decompression bomb?): {self._where}",
                    Reason.TOO_LARGE,
                )
            pending = self._inflater.unconsumed_tail
            if self._inflater.eof and self._inflater.unused_data:
                # Concatenated gzip members form one stream (RFC 1952); go on with the next.
                pending = self._inflater.unused_data
                self._inflater = zlib.decompressobj(self._inflater_wbits)
        self.total += len(out)
        return bytes(out)


@dataclass(eq=False, kw_only=True)
class HttpFetcher:
    """http(s):// with one shared connection pool; use as ``async with HttpFetcher() as f``."""

    connect_timeout_s: float = _DEFAULTS.connect_timeout_s
    read_timeout_s: float = _DEFAULTS.read_timeout_s
    total_timeout_s: float = _DEFAULTS.total_timeout_s
    max_bytes: int = _DEFAULTS.max_download_bytes
    max_redirects: int = _DEFAULTS.fetch_max_redirects
    per_host_limit: int = _DEFAULTS.fetch_per_host_limit
    total_limit: int = 64
    allow_networks: InitVar[Iterable[str]] = ()
    retries: int = _DEFAULTS.fetch_retries
    retry_backoff_s: float = 0.2
    retry_after_max_s: float = _RETRY_DEFAULTS.retry_after_max_s
    policy: AddressPolicy = field(init=False)
    holds: HostHolds = field(default_factory=HostHolds, init=False)  # origins asking to wait
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _resolver: GuardedResolver | None = field(default=None, init=False, repr=False)

    def __post_init__(self, allow_networks: Iterable[str]) -> None:
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.retry_after_max_s < 0:
            raise ValueError("retry_after_max_s must be >= 0")
        self.policy = AddressPolicy(allow_networks)

    async def __aenter__(self) -> HttpFetcher:
        await self.open()
        return self

    async def open(self) -> None:
        """Start the connection pool (what ``async with`` does)."""
        self._resolver = GuardedResolver(self.policy)
        connector = aiohttp.TCPConnector(
            limit=self.total_limit,
            limit_per_host=self.per_host_limit,
            resolver=self._resolver,
        )
        timeout = aiohttp.ClientTimeout(
            total=self.total_timeout_s,
            sock_connect=self.connect_timeout_s,
            sock_read=self.read_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={
                "User-Agent": _USER_AGENT,
                "Accept": "image/*,*/*;q=0.5",
                "Accept-Encoding": "identity",
            },
            raise_for_status=False,
            # Bodies are inflated by hand, against the byte cap (see _BoundedInflater).
            auto_decompress=False,
        )

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
        if self._resolver is not None:
            resolver, self._resolver = self._resolver, None
            await resolver.close()

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        """Fetch an http(s) URL; raise PermanentError/TransientError with a reason code.

        With ``etag`` / ``last_modified`` the request is conditional, and an unchanged
        image comes back as ``not_modified=True`` with no body.
        """
        started_s = time.perf_counter()
        result = await self._with_retries(url, etag, last_modified)
        result.fetch_ms = (time.perf_counter() - started_s) * 1000.0
        return result

    async def _with_retries(
        self, url: str, etag: str | None, last_modified: str | None
    ) -> FetchResult:
        attempt = 0
        while True:
            try:
                # One deadline for the whole fetch, whatever the number of hops and chunks.
                async with asyncio.timeout(self.total_timeout_s):
                    return await self._fetch_http(url, etag, last_modified)
            except TimeoutError:
                raise TransientError(
                    f"timed out after {self.total_timeout_s} s in total: {redact_url(url)}",
                    Reason.TIMEOUT,
                ) from None
            except TransientError as exc:
                if exc.reason is not Reason.CONNECTION or attempt >= self.retries:
                    raise
            attempt += 1
            await asyncio.sleep(random.uniform(0.5, 1.0) * self.retry_backoff_s * 2**attempt)

    async def _fetch_http(
        self, url: str, etag: str | None, last_modified: str | None
    ) -> FetchResult:
        if self._session is None:
            raise RuntimeError("HttpFetcher used outside 'async with'")
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        current = url
        for hop in range(self.max_redirects + 1):
            where = redact_url(current)
            self.policy.check_literal_host(urllib.parse.urlsplit(current).hostname, where)
            if self.holds:  # almost always empty: no per-request parse for it
                self._raise_if_held(origin_of(current), where)
            # The exception chain is dropped (`from None`) because aiohttp's exceptions
            # may carry the URL with its credentials, and tracebacks get logged.
            try:
                async with self._session.get(
                    current, allow_redirects=False, headers=headers
                ) as resp:
                    location = resp.headers.get("Location")
                    if resp.status in _REDIRECT_STATUSES and location and self.max_redirects:
                        current = self._next_hop(current, location)
                        continue
                    if resp.status == 304 and headers:
                        return FetchResult(
                            b"",
                            resp.headers.get("ETag", etag),
                            resp.headers.get("Last-Modified", last_modified),
                            0.0,
                            not_modified=True,
                            redirects=hop,
                        )
                    wait_s = hold_s(
                        resp.status, resp.headers.get("Retry-After"), self.retry_after_max_s
                    )
                    if wait_s is not None:
                        self.holds.hold(origin_of(current), wait_s, resp.status)
                    failure = error_for_status(resp.status, current, retry_after_s=wait_s)
                    if failure is not None:
                        raise failure
                    data = await self._read_body(resp, where)
                    return FetchResult(
                        data,
                        resp.headers.get("ETag"),
                        resp.headers.get("Last-Modified"),
                        0.0,
                        redirects=hop,
                    )
            except JobFailure:
                raise
            except (aiohttp.InvalidURL, aiohttp.RedirectClientError, ValueError) as exc:
                raise PermanentError(
                    f"invalid URL ({type(exc).__name__}: {_scrub(str(exc), current)}): {where}",
                    Reason.UNSUPPORTED_URL,
                ) from None
            except TimeoutError as exc:
                # aiohttp's connect/read timeouts subclass TimeoutError.
                raise TransientError(
                    f"timed out ({type(exc).__name__}): {where}", Reason.TIMEOUT
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                # Refused, reset, DNS failure, TLS failure, body cut short.
                raise TransientError(
                    f"connection failed ({type(exc).__name__}: {_scrub(str(exc), current)}): "
                    f"{where}",
                    Reason.CONNECTION,
                ) from None
        raise PermanentError(
            f"too many redirects (more than {self.max_redirects}): {redact_url(url)}",
            Reason.HTTP_4XX,
        )

    def _raise_if_held(self, origin: str, where: str) -> None:
        """Do not ask an origin that asked this worker to wait: hand the job back for then.

        Not an attempt of the job (``tried=False``): it never reached the origin.
        """
        held = self.holds.held(origin)
        if held is None:
            return
        reason = Reason.HTTP_429 if held.status == 429 else Reason.HTTP_5XX
        raise TransientError(
            f"held off {held.left_s:.1f} s more: the host answered HTTP {held.status} with "
            f"Retry-After: {where}",
            reason,
            retry_after_s=held.left_s,
            tried=False,
        )

    def _next_hop(self, current: str, location: str) -> str:
        target = urllib.parse.urljoin(current, location.strip())
        scheme = urllib.parse.urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            raise PermanentError(
                f"redirect to unsupported scheme {scheme!r}: {redact_url(current)}",
                Reason.UNSUPPORTED_URL,
            )
        return target

    async def _read_body(self, resp: aiohttp.ClientResponse, where: str) -> bytes:
        declared_bytes = resp.content_length
        if declared_bytes is not None and declared_bytes > self.max_bytes:
            # close() rather than release(): draining a huge body to reuse the connection
            # would cost exactly what this check is meant to save.
            resp.close()
            raise PermanentError(
                f"Content-Length {declared_bytes} > max {self.max_bytes} bytes: {where}",
                Reason.TOO_LARGE,
            )
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        inflater: _BoundedInflater | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            inflater = _BoundedInflater(encoding, self.max_bytes, where)
        elif encoding not in ("", "identity"):
            resp.close()
            raise PermanentError(
                f"unsupported Content-Encoding {encoding!r}: {where}", Reason.UNDECODABLE
            )
        buffer = bytearray()
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
                buffer += inflater.feed(chunk) if inflater else chunk
                if len(buffer) > self.max_bytes:
                    raise PermanentError(
                        f"body exceeds max {self.max_bytes} bytes: {where}", Reason.TOO_LARGE
                    )
        except PermanentError:
            resp.close()
            raise
        return bytes(buffer)
