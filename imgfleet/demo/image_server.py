"""A loopback HTTP server for a directory of images: the demo's stand-in for a CDN.

GET and HEAD with Content-Length, ETag and Last-Modified, conditional requests
(If-None-Match and If-Modified-Since answered 304), 404 for what is not there, and no log
noise. The demo and the benchmarks serve their corpus with it; the tests' misbehaving
variant (errors, delays, drips, redirects, gzip bombs, request counts) subclasses it in
``tests/support/faulty_image_server.py``.

    with ImageServer(corpus.root) as server:
        url = server.base_url + "/images/sku-00001-0.jpg"
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import threading
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

_HOST = "127.0.0.1"
# An idle keep-alive connection is dropped after this, so a client that vanishes cannot
# pin a handler thread for the life of the server.
_IDLE_CONNECTION_TIMEOUT_S = 30.0
_SHUTDOWN_JOIN_TIMEOUT_S = 5.0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, owner: ImageServer) -> None:
        self.owner = owner
        super().__init__((_HOST, 0), owner.handler_class)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-response are normal (cancelled fetches, timeouts in
        # tests); a traceback on stderr for each would bury real failures.
        return


class ImageRequestHandler(BaseHTTPRequestHandler):
    """Answers one request from the files under the server's root."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN would offer
    server_version = "imgfleet-image-server"
    sys_version = ""
    timeout = _IDLE_CONNECTION_TIMEOUT_S
    server: _QuietServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self.respond(unquote(urlsplit(self.path).path), send_body=True)

    def do_HEAD(self) -> None:
        self.respond(unquote(urlsplit(self.path).path), send_body=False)

    def respond(self, path: str, send_body: bool) -> None:
        file_path = self.server.owner.resolve(path)
        if file_path is None:
            self.send_plain(HTTPStatus.NOT_FOUND, send_body)
            return
        data = file_path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        mtime_s = int(file_path.stat().st_mtime)
        if self._not_modified(etag, mtime_s):
            self.send_not_modified(etag, mtime_s)
            return
        content_type = mimetypes.guess_type(file_path.name)[0] or "application/octet-stream"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(mtime_s, usegmt=True))
        self.send_header("Cache-Control", "public, max-age=3600")
        self.end_headers()
        if send_body:
            self.write_body(data)

    def write_body(self, data: bytes) -> None:
        self.wfile.write(data)

    def send_not_modified(self, etag: str, mtime_s: int) -> None:
        self.send_response(HTTPStatus.NOT_MODIFIED)
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(mtime_s, usegmt=True))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_plain(self, status: int, send_body: bool) -> None:
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

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


class ImageServer:
    """Serves files under ``root`` on 127.0.0.1 at a free port, from a daemon thread."""

    handler_class: type[ImageRequestHandler] = ImageRequestHandler

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
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

    def __enter__(self) -> Self:
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

    def resolve(self, path: str) -> Path | None:
        """The file a request path names, or None (absent, or outside ``root``)."""
        candidate = (self.root / path.lstrip("/")).resolve()
        # Anything outside root (via "..") is treated as absent, never served.
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate
