"""A loopback HTTP server for a directory of images, with fault hooks for tests.

It stands in for the catalogue's CDN in the demo, tests and benchmarks: GET and HEAD with
Content-Length, ETag and Last-Modified, conditional requests (If-None-Match and
If-Modified-Since answered 304), 404 for what is not there, and no log noise. Tests make it
misbehave per path: answer with an error status for the next N requests, answer slowly,
drip the body a few bytes at a time, redirect (a loop, if pointed at itself), or send a
gzip bomb; and count how often each path was asked for (to check retries and caching).

    with ImageServer(corpus.root) as server:
        url = server.base_url + "/images/sku-00001-0.jpg"
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

_HOST = "127.0.0.1"
# An idle keep-alive connection is dropped after this, so a client that vanishes cannot
# pin a handler thread for the life of the server.
_IDLE_CONNECTION_TIMEOUT_S = 30.0
_SHUTDOWN_JOIN_TIMEOUT_S = 5.0


@dataclass
class _Failure:
    status: int
    remaining: int


@dataclass(frozen=True)
class _Drip:
    chunk_bytes: int
    interval_s: float


@dataclass(frozen=True)
class _Bomb:
    body: bytes  # gzip of zeros, inflating to inflated_bytes
    inflated_bytes: int


def _matching(table: dict[str, Any], path: str) -> Any:
    for suffix, value in table.items():
        if _suffix_matches(path, suffix):
            return value
    return None


def _suffix_matches(path: str, suffix: str) -> bool:
    # Match on whole path segments, so "a.jpg" does not also catch "/images/extra.jpg".
    wanted = "/" + suffix.lstrip("/")
    return path == wanted or path.endswith(wanted)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, owner: ImageServer) -> None:
        self.owner = owner
        super().__init__((_HOST, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-response are normal (cancelled fetches, timeouts in
        # tests); a traceback on stderr for each would bury real failures.
        return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN would offer
    server_version = "imgfleet-image-server"
    sys_version = ""
    timeout = _IDLE_CONNECTION_TIMEOUT_S
    server: _QuietServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        owner._count(path)
        delay_s = owner._delay_for(path)
        if delay_s > 0:
            time.sleep(delay_s)
        status = owner._take_failure(path)
        if status is not None:
            self._send_plain(status, send_body)
            return
        with owner._lock:
            location = _matching(owner._redirects, path)
            bomb = _matching(owner._bombs, path)
            drip = _matching(owner._drips, path)
        if location is not None:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if bomb is not None:
            self._send_bomb(bomb, send_body)
            return
        file_path = owner._resolve(path)
        if file_path is None:
            self._send_plain(HTTPStatus.NOT_FOUND, send_body)
            return
        data = file_path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        mtime_s = int(file_path.stat().st_mtime)
        if self._not_modified(etag, mtime_s):
            owner._count_not_modified()
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", formatdate(mtime_s, usegmt=True))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        content_type = mimetypes.guess_type(file_path.name)[0] or "application/octet-stream"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(mtime_s, usegmt=True))
        self.send_header("Cache-Control", "public, max-age=3600")
        self.end_headers()
        if not send_body:
            return
        if drip is None:
            self.wfile.write(data)
            return
        for start in range(0, len(data), drip.chunk_bytes):
            self.wfile.write(data[start : start + drip.chunk_bytes])
            self.wfile.flush()
            time.sleep(drip.interval_s)

    def _not_modified(self, etag: str, mtime_s: int) -> bool:
        # RFC 9110: If-None-Match wins; If-Modified-Since only counts without it.
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None:
            tags = {t.strip() for t in if_none_match.split(",")}
            return etag in tags or "*" in tags
        if_modified_since = self.headers.get("If-Modified-Since")
        if if_modified_since:
            try:
                since_s = parsedate_to_datetime(if_modified_since).timestamp()
            except (TypeError, ValueError):
                return False
            return mtime_s <= since_s
        return False

    def _send_bomb(self, bomb: _Bomb, send_body: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(bomb.body)))
        self.end_headers()
        if send_body:
            self.wfile.write(bomb.body)

    def _send_plain(self, status: int, send_body: bool) -> None:
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


class ImageServer:
    """Serves files under ``root`` on 127.0.0.1 at a free port, from a daemon thread."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._failures: dict[str, _Failure] = {}
        self._delays_s: dict[str, float] = {}
        self._drips: dict[str, _Drip] = {}
        self._redirects: dict[str, str] = {}
        self._bombs: dict[str, _Bomb] = {}
        self._counts: Counter[str] = Counter()
        self._not_modified = 0
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> ImageServer:
        if self._server is not None:
            return self
        self._server = _QuietServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="imgfleet-image-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(_SHUTDOWN_JOIN_TIMEOUT_S)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("ImageServer is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    def url_for(self, relative_path: str) -> str:
        return f"{self.base_url}/{relative_path.lstrip('/')}"

    # --- fault hooks -----------------------------------------------------------------------

    def fail_next(self, path_suffix: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests whose path ends with ``path_suffix`` get ``status``."""
        HTTPStatus(status)  # reject codes the handler could not describe
        with self._lock:
            if times <= 0:
                self._failures.pop(path_suffix, None)
            else:
                self._failures[path_suffix] = _Failure(status, times)

    def delay_s(self, path_suffix: str, seconds: float) -> None:
        """Every request for a matching path waits ``seconds`` first; 0 removes the delay."""
        with self._lock:
            if seconds <= 0:
                self._delays_s.pop(path_suffix, None)
            else:
                self._delays_s[path_suffix] = seconds

    def drip(self, path_suffix: str, chunk_bytes: int = 1, interval_s: float = 0.1) -> None:
        """Send matching bodies ``chunk_bytes`` at a time, ``interval_s`` apart (slow origin
        that never trips a read timeout)."""
        if chunk_bytes <= 0 or interval_s < 0:
            raise ValueError("chunk_bytes must be > 0 and interval_s >= 0")
        with self._lock:
            self._drips[path_suffix] = _Drip(chunk_bytes, interval_s)

    def redirect(self, path_suffix: str, location: str) -> None:
        """Answer matching paths with 302 to ``location`` (its own path makes a loop)."""
        with self._lock:
            self._redirects[path_suffix] = location

    def gzip_bomb(self, path_suffix: str, inflated_bytes: int = 1 << 30) -> None:
        """Answer matching paths with a small gzip body inflating to ``inflated_bytes``."""
        zeros = bytes(1 << 20)
        compressor = gzip.compress(zeros, compresslevel=9, mtime=0)
        # A gzip file of several members is still one gzip stream to a reader.
        members, remainder = divmod(inflated_bytes, len(zeros))
        body = compressor * members + gzip.compress(bytes(remainder), mtime=0)
        with self._lock:
            self._bombs[path_suffix] = _Bomb(body, inflated_bytes)

    def clear_faults(self) -> None:
        with self._lock:
            self._failures.clear()
            self._delays_s.clear()
            self._drips.clear()
            self._redirects.clear()
            self._bombs.clear()

    def not_modified_count(self) -> int:
        """How many 304 answers the server has given."""
        with self._lock:
            return self._not_modified

    def request_count(self, path: str) -> int:
        """Requests (GET and HEAD, whatever the answer) whose path ends with ``path``."""
        with self._lock:
            return sum(n for p, n in self._counts.items() if _suffix_matches(p, path))

    def total_requests(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # --- used by the handler ---------------------------------------------------------------

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def _count_not_modified(self) -> None:
        with self._lock:
            self._not_modified += 1

    def _delay_for(self, path: str) -> float:
        with self._lock:
            return max(
                (s for suffix, s in self._delays_s.items() if _suffix_matches(path, suffix)),
                default=0.0,
            )

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            for suffix, failure in self._failures.items():
                if _suffix_matches(path, suffix):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        del self._failures[suffix]
                    return failure.status
        return None

    def _resolve(self, path: str) -> Path | None:
        candidate = (self.root / path.lstrip("/")).resolve()
        # Anything outside root (via "..") is treated as absent, never served.
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate
