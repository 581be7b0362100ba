"""Fetch safety and bounds against the loopback image server: SSRF guard, redirects,
gzip bombs, slow drip, conditional requests and connection-level retries."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import JobFailure, PermanentError, Reason, TransientError
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from tests.support.fetching import url_fetcher
from workers.fetch.types import FetchResult
from workers.fetch.url_guard import AddressPolicy, BlockedAddressError

LOOPBACK = ["127.0.0.1/32"]
PAYLOAD = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 64


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(PAYLOAD)
    with ImageServer(tmp_path) as srv:
        yield srv


def fetch(url: str, **kwargs: Any) -> FetchResult:
    validators = {k: kwargs.pop(k) for k in ("etag", "last_modified") if k in kwargs}

    async def go() -> FetchResult:
        async with url_fetcher(**kwargs) as fetcher:
            return await fetcher.fetch(url, **validators)

    return asyncio.run(go())


def fetch_error(url: str, **kwargs: Any) -> JobFailure:
    with pytest.raises(JobFailure) as info:
        fetch(url, **kwargs)
    return info.value


# --- SSRF guard ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.200", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("224.0.0.1", "multicast"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_policy_blocks_non_public_addresses(address: str, blocked: str | None) -> None:
    why = AddressPolicy().why_blocked(address)
    if blocked is None:
        assert why is None
    else:
        assert why is not None and blocked in why


def test_policy_allowlist_is_exact_about_networks() -> None:
    policy = AddressPolicy(["127.0.0.1", "10.20.0.0/16"])
    assert policy.why_blocked("127.0.0.1") is None
    assert policy.why_blocked("::ffff:127.0.0.1") is None
    assert policy.why_blocked("127.0.0.2") is not None
    assert policy.why_blocked("10.20.9.9") is None
    assert policy.why_blocked("10.21.0.1") is not None
    assert policy.why_blocked("169.254.169.254") is not None


def test_loopback_literal_is_refused_without_allowlist(server: ImageServer) -> None:
    error = fetch_error(server.url_for("images/a.jpg"))
    assert isinstance(error, BlockedAddressError)
    assert error.reason == Reason.UNSUPPORTED_URL and not error.transient
    assert "loopback" in error.message and "fetch_allow_networks" in error.message
    assert server.total_requests() == 0  # refused before any connection


def test_name_resolving_to_loopback_is_refused(server: ImageServer) -> None:
    url = f"http://localhost:{server.port}/images/a.jpg"
    error = fetch_error(url)
    assert error.reason == Reason.UNSUPPORTED_URL and not error.transient
    assert "localhost" in error.message
    assert server.total_requests() == 0
    # With the allowlist the same name works: the check is on the address, not the name.
    assert fetch(url, allow_networks=LOOPBACK).data == PAYLOAD


def test_redirect_to_metadata_address_is_refused(server: ImageServer) -> None:
    server.redirect("steal.jpg", "http://169.254.169.254/latest/meta-data/")
    error = fetch_error(server.url_for("images/steal.jpg"), allow_networks=LOOPBACK)
    assert error.reason == Reason.UNSUPPORTED_URL
    assert "169.254.169.254" in error.message


# --- redirects, bombs, slow origins --------------------------------------------------------


def test_redirect_loop_ends_permanent_after_the_limit(server: ImageServer) -> None:
    server.redirect("loop.jpg", "/images/loop.jpg")
    error = fetch_error(server.url_for("images/loop.jpg"), allow_networks=LOOPBACK, max_redirects=4)
    assert error.reason == Reason.HTTP_4XX and not error.transient
    assert "too many redirects" in error.message
    assert server.request_count("loop.jpg") == 5  # the first request and four hops


def test_relative_redirect_is_followed(server: ImageServer) -> None:
    server.redirect("old.jpg", "a.jpg")
    result = fetch(server.url_for("images/old.jpg"), allow_networks=LOOPBACK)
    assert result.data == PAYLOAD and result.redirects == 1


def test_gzip_bomb_stops_at_the_cap(server: ImageServer) -> None:
    server.gzip_bomb("bomb.jpg", inflated_bytes=256 * 2**20)
    error = fetch_error(
        server.url_for("images/bomb.jpg"), allow_networks=LOOPBACK, max_bytes=4 * 2**20
    )
    assert error.reason == Reason.TOO_LARGE and not error.transient
    assert "bomb" in error.message


def test_gzip_body_under_the_cap_is_inflated(server: ImageServer) -> None:
    server.gzip_bomb("small.jpg", inflated_bytes=3 * 2**20 + 5)
    result = fetch(server.url_for("images/small.jpg"), allow_networks=LOOPBACK)
    assert len(result.data) == 3 * 2**20 + 5 and not any(result.data[:1000])


def test_slow_drip_is_cut_by_the_total_timeout(server: ImageServer) -> None:
    server.drip("a.jpg", chunk_bytes=64, interval_s=0.05)  # ~13 s for the whole body
    error = fetch_error(
        server.url_for("images/a.jpg"),
        allow_networks=LOOPBACK,
        read_timeout_s=5.0,
        total_timeout_s=1.0,
    )
    assert error.reason == Reason.TIMEOUT and error.transient


# --- conditional requests ------------------------------------------------------------------


def test_conditional_request_with_etag_is_not_modified(server: ImageServer) -> None:
    first = fetch(server.url_for("images/a.jpg"), allow_networks=LOOPBACK)
    assert first.etag and first.last_modified and not first.not_modified
    again = fetch(server.url_for("images/a.jpg"), allow_networks=LOOPBACK, etag=first.etag)
    assert again.not_modified and again.data == b""
    assert again.etag == first.etag
    assert server.not_modified_count() == 1


def test_conditional_request_with_last_modified(server: ImageServer) -> None:
    first = fetch(server.url_for("images/a.jpg"), allow_networks=LOOPBACK)
    again = fetch(
        server.url_for("images/a.jpg"), allow_networks=LOOPBACK, last_modified=first.last_modified
    )
    assert again.not_modified
    stale = fetch(
        server.url_for("images/a.jpg"),
        allow_networks=LOOPBACK,
        etag='"something-else"',
        last_modified=first.last_modified,
    )
    # If-None-Match wins over If-Modified-Since: a changed ETag means a full body.
    assert not stale.not_modified and stale.data == PAYLOAD


# --- retries -------------------------------------------------------------------------------


class _ResetOnce:
    """A raw TCP server that resets the first connection and serves the second."""

    def __init__(self, resets: int) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.resets = resets
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                if self.connections <= self.resets:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
                    continue  # close with RST
                body = PAYLOAD
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )

    def close(self) -> None:
        self.sock.close()


def test_connection_resets_are_retried_in_place_then_transient() -> None:
    # aiohttp may itself re-send once on a fresh connection's reset, so count relative to
    # what one attempt of ours costs.
    origin = _ResetOnce(resets=10**6)
    try:
        url = f"http://127.0.0.1:{origin.port}/a.jpg"
        error = fetch_error(url, allow_networks=LOOPBACK, retries=0)
        assert isinstance(error, TransientError) and error.reason == Reason.CONNECTION
        per_attempt = origin.connections
        assert per_attempt >= 1
        origin.connections = 0
        fetch_error(url, allow_networks=LOOPBACK, retries=2, retry_backoff_s=0.01)
        assert origin.connections == 3 * per_attempt
    finally:
        origin.close()
    origin = _ResetOnce(resets=per_attempt)  # the first attempt fails, the retry succeeds
    try:
        result = fetch(
            f"http://127.0.0.1:{origin.port}/a.jpg",
            allow_networks=LOOPBACK,
            retries=1,
            retry_backoff_s=0.01,
        )
        assert result.data == PAYLOAD
    finally:
        origin.close()


def test_http_5xx_is_not_retried_in_place(server: ImageServer) -> None:
    server.fail_next("a.jpg", 503, times=1)
    error = fetch_error(server.url_for("images/a.jpg"), allow_networks=LOOPBACK, retries=3)
    assert error.reason == Reason.HTTP_5XX and error.transient
    assert server.request_count("a.jpg") == 1  # the broker's backoff decides, not us


def test_file_urls_can_be_switched_off(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(PAYLOAD)
    assert fetch(path.as_uri()).data == PAYLOAD
    error = fetch_error(path.as_uri(), allow_file_urls=False)
    assert isinstance(error, PermanentError) and error.reason == Reason.UNSUPPORTED_URL


def test_gzip_module_agrees_with_server_bomb_size(server: ImageServer) -> None:
    # The fault hook itself: the body really inflates to what it claims.
    server.gzip_bomb("check.jpg", inflated_bytes=2 * 2**20 + 7)
    body = server._bombs["check.jpg"].body
    assert len(body) < 64 * 1024
    assert len(gzip.decompress(body)) == 2 * 2**20 + 7
