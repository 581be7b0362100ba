"""The loopback image server of the demo, made to misbehave per path, for tests.

``FaultyImageServer`` serves like ``imgfleet.demo.image_server.ImageServer`` and adds the
faults a CDN has: answer with an error status for the next N requests (with Retry-After,
if asked), answer slowly, drip the body a few bytes at a time, redirect (a loop, if
pointed at itself), or send a gzip bomb; and it counts how often each path was asked for
and how many 304s it gave (to check retries and caching), and when (``request_times``, to
check their spacing). A fault is set for a path *suffix*, matched on whole path
segments ("a.jpg" does not also catch "/images/extra.jpg").

    with FaultyImageServer(root) as server:
        server.fail_next("flaky.jpg", 503, times=2)
"""

from __future__ import annotations

import email.utils
import gzip
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from imgfleet.demo.image_server import ImageRequestHandler, ImageServer


@dataclass
class _Failure:
    status: int
    remaining: int
    retry_after_s: float | None = None
    retry_after_date: bool = False

    def retry_after(self) -> str | None:
        """The Retry-After header value, worked out when the answer is sent."""
        if self.retry_after_s is None:
            return None
        if self.retry_after_date:
            return email.utils.formatdate(time.time() + self.retry_after_s, usegmt=True)
        return f"{self.retry_after_s:g}"


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
    wanted = "/" + suffix.lstrip("/")
    return path == wanted or path.endswith(wanted)


class _FaultyHandler(ImageRequestHandler):
    _drip: _Drip | None = None

    def respond(self, path: str, send_body: bool) -> None:
        owner = self.server.owner
        assert isinstance(owner, FaultyImageServer)
        owner._count(path)
        delay_s = owner._delay_for(path)
        if delay_s > 0:
            time.sleep(delay_s)
        failure = owner._take_failure(path)
        if failure is not None:
            self._send_failure(failure, send_body)
            return
        with owner._lock:
            location = _matching(owner._redirects, path)
            bomb = _matching(owner._bombs, path)
            self._drip = _matching(owner._drips, path)
        if location is not None:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if bomb is not None:
            self._send_bomb(bomb, send_body)
            return
        super().respond(path, send_body)

    def send_not_modified(self, etag: str, mtime_s: int) -> None:
        owner = self.server.owner
        assert isinstance(owner, FaultyImageServer)
        owner._count_not_modified()
        super().send_not_modified(etag, mtime_s)

    def write_body(self, data: bytes) -> None:
        drip = self._drip
        if drip is None:
            super().write_body(data)
            return
        for start in range(0, len(data), drip.chunk_bytes):
            self.wfile.write(data[start : start + drip.chunk_bytes])
            self.wfile.flush()
            time.sleep(drip.interval_s)

    def _send_failure(self, failure: _Failure, send_body: bool) -> None:
        retry_after = failure.retry_after()
        if retry_after is None:
            self.send_plain(failure.status, send_body)
            return
        body = f"{failure.status} {HTTPStatus(failure.status).phrase}\n".encode()
        self.send_response(failure.status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _send_bomb(self, bomb: _Bomb, send_body: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(bomb.body)))
        self.end_headers()
        if send_body:
            self.wfile.write(bomb.body)


class FaultyImageServer(ImageServer):
    """An ``ImageServer`` with per-path faults and request counts (tests only)."""

    handler_class = _FaultyHandler

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self._lock = threading.Lock()
        self._failures: dict[str, _Failure] = {}
        self._delays_s: dict[str, float] = {}
        self._drips: dict[str, _Drip] = {}
        self._redirects: dict[str, str] = {}
        self._bombs: dict[str, _Bomb] = {}
        self._counts: Counter[str] = Counter()
        self._times: dict[str, list[float]] = {}
        self._not_modified = 0

    # --- faults ----------------------------------------------------------------------------

    def fail_next(
        self,
        path_suffix: str,
        status: int,
        times: int = 1,
        *,
        retry_after_s: float | None = None,
        retry_after_date: bool = False,
    ) -> None:
        """The next ``times`` requests whose path ends with ``path_suffix`` get ``status``.

        With ``retry_after_s`` the answers carry ``Retry-After``: that many seconds, or,
        with ``retry_after_date``, the HTTP-date that many seconds after the answer.
        """
        HTTPStatus(status)  # reject codes the handler could not describe
        with self._lock:
            if times <= 0:
                self._failures.pop(path_suffix, None)
            else:
                self._failures[path_suffix] = _Failure(
                    status, times, retry_after_s, retry_after_date
                )

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

    # --- counts ----------------------------------------------------------------------------

    def not_modified_count(self) -> int:
        """How many 304 answers the server has given."""
        with self._lock:
            return self._not_modified

    def request_count(self, path: str) -> int:
        """Requests (GET and HEAD, whatever the answer) whose path ends with ``path``."""
        with self._lock:
            return sum(n for p, n in self._counts.items() if _suffix_matches(p, path))

    def request_times(self, path: str) -> list[float]:
        """``time.monotonic()`` at each request whose path ends with ``path``, in order."""
        with self._lock:
            return sorted(
                t for p, times in self._times.items() if _suffix_matches(p, path) for t in times
            )

    def total_requests(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._times.clear()

    # --- used by the handler ---------------------------------------------------------------

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1
            self._times.setdefault(path, []).append(time.monotonic())

    def _count_not_modified(self) -> None:
        with self._lock:
            self._not_modified += 1

    def _delay_for(self, path: str) -> float:
        with self._lock:
            return max(
                (s for suffix, s in self._delays_s.items() if _suffix_matches(path, suffix)),
                default=0.0,
            )

    def _take_failure(self, path: str) -> _Failure | None:
        with self._lock:
            for suffix, failure in self._failures.items():
                if _suffix_matches(path, suffix):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        del self._failures[suffix]
                    return failure
        return None
