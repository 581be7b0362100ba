"""The loopback image server (bytes, validators, 404, HEAD) and the tests' faulty one."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfleet.demo.image_server import ImageServer
from tests.support.faulty_image_server import FaultyImageServer

PAYLOAD = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


def _root(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(PAYLOAD)
    (tmp_path / "secret.txt").write_text("outside images but inside root")
    return tmp_path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    with ImageServer(_root(tmp_path)) as srv:
        yield srv


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[FaultyImageServer]:
    with FaultyImageServer(_root(tmp_path)) as srv:
        yield srv


def _get(url: str, method: str = "GET", headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_serves_bytes_with_validators(server: ImageServer) -> None:
    assert server.base_url.startswith("http://127.0.0.1:")
    status, headers, body = _get(server.base_url + "/images/a.jpg")
    assert status == 200
    assert body == PAYLOAD
    assert headers["Content-Length"] == str(len(PAYLOAD))
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')
    assert "GMT" in headers["Last-Modified"]
    again = _get(server.base_url + "/images/a.jpg")
    assert again[1]["ETag"] == headers["ETag"]
    status, _, body = _get(
        server.base_url + "/images/a.jpg", headers={"If-None-Match": headers["ETag"]}
    )
    assert (status, body) == (304, b"")


def test_missing_file_is_404_and_root_escape_is_refused(server: ImageServer) -> None:
    assert _get(server.base_url + "/images/nope.jpg")[0] == 404
    assert _get(server.base_url + "/images/../../etc/passwd")[0] == 404
    assert _get(server.base_url + "/images/")[0] == 404


def test_head_sends_headers_without_body(server: ImageServer) -> None:
    status, headers, body = _get(server.base_url + "/images/a.jpg", method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(len(PAYLOAD))
    assert _get(server.base_url + "/images/nope.jpg", method="HEAD")[0] == 404


def test_the_demo_server_has_no_fault_hooks() -> None:
    hooks = ("fail_next", "delay_s", "drip", "redirect", "gzip_bomb", "clear_faults")
    counts = ("request_count", "not_modified_count", "total_requests", "reset_counts")
    assert not any(hasattr(ImageServer, name) for name in hooks + counts)


def test_faulty_server_serves_and_counts_304s(faulty: FaultyImageServer) -> None:
    status, headers, body = _get(faulty.base_url + "/images/a.jpg")
    assert (status, body) == (200, PAYLOAD)
    status, _, body = _get(
        faulty.base_url + "/images/a.jpg", headers={"If-None-Match": headers["ETag"]}
    )
    assert (status, body) == (304, b"")
    assert faulty.not_modified_count() == 1
    assert faulty.total_requests() == 2


def test_fail_next_503_twice_then_200(faulty: FaultyImageServer) -> None:
    server = faulty
    server.fail_next("a.jpg", 503, times=2)
    statuses = [_get(server.base_url + "/images/a.jpg")[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert server.request_count("/images/a.jpg") == 3
    assert server.request_count("a.jpg") == 3
    assert server.request_count("b.jpg") == 0


def test_fail_next_matches_whole_path_segments(faulty: FaultyImageServer) -> None:
    server = faulty
    server.fail_next("a.jpg", 500, times=1)
    assert _get(server.base_url + "/images/xa.jpg")[0] == 404  # not the fault
    assert _get(server.base_url + "/images/a.jpg")[0] == 500


def test_delay_slows_matching_paths_only(faulty: FaultyImageServer) -> None:
    server = faulty
    server.delay_s("a.jpg", 0.3)
    started = time.monotonic()
    assert _get(server.base_url + "/images/a.jpg")[0] == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert _get(server.base_url + "/images/other.jpg")[0] == 404
    assert time.monotonic() - started < 0.3
    server.delay_s("a.jpg", 0)
    started = time.monotonic()
    _get(server.base_url + "/images/a.jpg")
    assert time.monotonic() - started < 0.3


def test_start_stop_restart(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    srv = ImageServer(tmp_path).start()
    try:
        assert _get(srv.base_url + "/x.png")[2] == b"\x89PNG"
    finally:
        srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = srv.base_url
