"""Fetcher against a real HTTP server on 127.0.0.1 and against file:// URLs."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from common.errors import JobFailure, PermanentError, Reason, TransientError
from tests.support.fetching import url_fetcher
from tests.support.http import serving
from workers.fetch.http import redact_url
from workers.fetch.types import FetchResult

IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
# The SSRF guard refuses loopback by default; these tests allow their own server.
LOOPBACK = ["127.0.0.1/32"]
SLOW_RESPONSE_S = 2.0
SMALL_MAX_BYTES = 1 * 2**20


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that connections are kept alive (pool reuse) and chunked encoding works.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        try:
            self._route(route)
        except (BrokenPipeError, ConnectionResetError):
            # The fetcher hangs up on oversized bodies on purpose.
            self.close_connection = True

    def _route(self, route: str) -> None:
        if route == "/image.png":
            headers = {
                "Content-Type": "image/png",
                "ETag": '"abc123"',
                "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT",
            }
            self._send(200, IMAGE_BYTES, headers)
        elif route == "/empty":
            self._send(200, b"", {"Content-Type": "image/png"})
        elif route == "/missing":
            self._send(404, b"not here")
        elif route == "/gone":
            self._send(410, b"gone")
        elif route == "/forbidden":
            self._send(403, b"no")
        elif route == "/throttled":
            self._send(429, b"slow down", {"Retry-After": "1"})
        elif route == "/busy":
            self._send(503, b"try later")
        elif route == "/slow":
            time.sleep(SLOW_RESPONSE_S)
            self._send(200, IMAGE_BYTES)
        elif route == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif route == "/redirect-once":
            self._send(301, b"", {"Location": "/image.png"})
        elif route == "/redirect-ftp":
            self._send(302, b"", {"Location": "ftp://127.0.0.1/x.png"})
        elif route == "/huge-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**30))
            self.end_headers()
            self.wfile.write(b"x" * 1024)
            self.close_connection = True
        elif route == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 65536
            for _ in range(3 * SMALL_MAX_BYTES // len(chunk)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif route == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"z" * 10)
            self.wfile.flush()
            self.close_connection = True
        else:
            self._send(404, b"no route")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up on purpose (oversized bodies, timeouts) are not test failures.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serving(_QuietServer(("127.0.0.1", 0), _Handler)) as url:
        yield url


def _fetch(url: str, **fetcher_kwargs: Any) -> FetchResult:
    async def go() -> FetchResult:
        fetcher_kwargs.setdefault("allow_networks", LOOPBACK)
        async with url_fetcher(**fetcher_kwargs) as fetcher:
            return await fetcher.fetch(url)

    return asyncio.run(go())


def _fetch_error(url: str, **fetcher_kwargs: Any) -> JobFailure:
    with pytest.raises(JobFailure) as info:
        _fetch(url, **fetcher_kwargs)
    return info.value


def test_image_body_and_validators(base_url: str) -> None:
    result = _fetch(f"{base_url}/image.png")
    assert result.data == IMAGE_BYTES
    assert result.etag == '"abc123"'
    assert result.last_modified == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert result.fetch_ms > 0


def test_empty_body_is_returned_not_raised(base_url: str) -> None:
    assert _fetch(f"{base_url}/empty").data == b""


def test_single_redirect_is_followed(base_url: str) -> None:
    assert _fetch(f"{base_url}/redirect-once").data == IMAGE_BYTES


@pytest.mark.parametrize(
    ("route", "error_type", "reason"),
    [
        ("/missing", PermanentError, Reason.HTTP_404),
        ("/gone", PermanentError, Reason.HTTP_404),
        ("/forbidden", PermanentError, Reason.HTTP_4XX),
        ("/throttled", TransientError, Reason.HTTP_429),
        ("/busy", TransientError, Reason.HTTP_5XX),
    ],
)
def test_status_codes_are_classified(
    base_url: str, route: str, error_type: type[JobFailure], reason: Reason
) -> None:
    error = _fetch_error(f"{base_url}{route}")
    assert type(error) is error_type
    assert error.reason == reason
    assert error.transient == (error_type is TransientError)


def test_slow_response_times_out_as_transient(base_url: str) -> None:
    started_s = time.perf_counter()
    error = _fetch_error(f"{base_url}/slow", read_timeout_s=0.3, total_timeout_s=5.0)
    assert error.reason == Reason.TIMEOUT and error.transient
    assert time.perf_counter() - started_s < SLOW_RESPONSE_S


def test_total_timeout_is_enforced(base_url: str) -> None:
    error = _fetch_error(f"{base_url}/slow", read_timeout_s=10.0, total_timeout_s=0.3)
    assert error.reason == Reason.TIMEOUT and error.transient


def test_redirect_loop_is_permanent(base_url: str) -> None:
    error = _fetch_error(f"{base_url}/loop", max_redirects=3)
    assert error.reason == Reason.HTTP_4XX and not error.transient
    assert "too many redirects" in error.message


def test_redirect_to_other_scheme_is_unsupported(base_url: str) -> None:
    error = _fetch_error(f"{base_url}/redirect-ftp")
    assert error.reason == Reason.UNSUPPORTED_URL and not error.transient


def test_redirects_disabled_with_zero(base_url: str) -> None:
    error = _fetch_error(f"{base_url}/redirect-once", max_redirects=0)
    assert error.reason == Reason.HTTP_4XX and not error.transient


def test_huge_content_length_rejected_before_reading(base_url: str) -> None:
    started_s = time.perf_counter()
    error = _fetch_error(f"{base_url}/huge-length")
    assert error.reason == Reason.TOO_LARGE and not error.transient
    assert time.perf_counter() - started_s < 2.0


def test_chunked_body_over_cap_is_cut_off(base_url: str) -> None:
    error = _fetch_error(f"{base_url}/chunked-big", max_bytes=SMALL_MAX_BYTES)
    assert error.reason == Reason.TOO_LARGE and not error.transient


def test_chunked_body_under_cap_is_read(base_url: str) -> None:
    assert len(_fetch(f"{base_url}/chunked-big").data) == 3 * SMALL_MAX_BYTES


def test_truncated_body_is_transient_connection(base_url: str) -> None:
    error = _fetch_error(f"{base_url}/truncated")
    assert error.reason == Reason.CONNECTION and error.transient


def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    error = _fetch_error(f"http://127.0.0.1:{port}/x.png", connect_timeout_s=1.0)
    assert error.reason == Reason.CONNECTION and error.transient


def test_credentials_never_appear_in_messages(base_url: str) -> None:
    url = base_url.replace("http://", "http://alice:s3cr3t@") + "/missing"
    error = _fetch_error(url)
    assert error.reason == Reason.HTTP_404
    assert "s3cr3t" not in str(error) and "alice" not in str(error)
    assert (
        redact_url("https://u:p@cdn.example:8443/a.jpg?x=1") == "https://cdn.example:8443/a.jpg?x=1"
    )


def test_failures_do_not_leak_pooled_connections(base_url: str) -> None:
    # With one connection per host, any response left unreleased would make the next
    # request wait for a free connection until it timed out.
    async def go() -> bytes:
        async with url_fetcher(
            per_host_limit=1,
            total_limit=1,
            total_timeout_s=3.0,
            max_bytes=SMALL_MAX_BYTES,
            allow_networks=LOOPBACK,
        ) as fetcher:
            for route in ["/chunked-big", "/huge-length", "/missing", "/busy", "/truncated"]:
                with pytest.raises(JobFailure):
                    await fetcher.fetch(f"{base_url}{route}")
            for _ in range(5):
                result = await fetcher.fetch(f"{base_url}/image.png")
            return result.data

    assert asyncio.run(asyncio.wait_for(go(), timeout=10.0)) == IMAGE_BYTES


def test_concurrent_fetches_share_the_pool(base_url: str) -> None:
    async def go() -> list[FetchResult]:
        async with url_fetcher(per_host_limit=4, allow_networks=LOOPBACK) as fetcher:
            return await asyncio.gather(
                *(fetcher.fetch(f"{base_url}/image.png?n={n}") for n in range(20))
            )

    assert all(r.data == IMAGE_BYTES for r in asyncio.run(go()))


def test_file_url(tmp_path: Path) -> None:
    path = tmp_path / "a b.png"
    path.write_bytes(IMAGE_BYTES)
    result = _fetch(path.as_uri())
    assert result.data == IMAGE_BYTES
    assert result.etag is None and result.last_modified is not None


def test_file_url_missing(tmp_path: Path) -> None:
    error = _fetch_error((tmp_path / "nope.png").as_uri())
    assert error.reason == Reason.HTTP_404 and not error.transient
    assert "file not found" in error.message


def test_file_url_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"0" * 2048)
    error = _fetch_error(path.as_uri(), max_bytes=1024)
    assert error.reason == Reason.TOO_LARGE and not error.transient


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "s3://bucket/key.jpg", "not a url"])
def test_unsupported_scheme(url: str) -> None:
    error = _fetch_error(url)
    assert error.reason == Reason.UNSUPPORTED_URL and not error.transient
