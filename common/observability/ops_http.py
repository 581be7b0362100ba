"""The ops listener of a process: ``/metrics``, ``/healthz`` (liveness), ``/readyz``.

It runs in its own thread (``http.server``), not on the process's event loop: a probe
must get an answer, and the right one, when the loop is blocked; answering from the loop
would turn "stuck" into "probe timed out" at best. The handlers only read timestamps and
flags (``common.observability.health``) and render the metrics registry, which are thread-safe.

    GET /metrics  Prometheus text (OpenMetrics when the scraper asks for it)
    GET /healthz  200 {"live": true, ...} | 503 with the failing check named
    GET /readyz   200 {"ready": true, ...} | 503 with the conditions
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.files import write_atomic
from common.observability.health import Health
from common.observability.logging import get_logger
from common.observability.metrics import MetricGroup


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    metrics: MetricGroup
    health: Health


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.metrics.render(self.headers.get("Accept", ""))
            self._send(200, body, content_type, send_body)
        elif path in ("/healthz", "/livez"):
            live, details = self.server.health.liveness()
            self._send_json(200 if live else 503, details, send_body)
        elif path == "/readyz":
            ready, details = self.server.health.readiness()
            self._send_json(200 if ready else 503, details, send_body)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", send_body)

    def _send_json(self, status: int, payload: dict[str, Any], send_body: bool) -> None:
        body = (json.dumps(payload, sort_keys=True) + "\n").encode()
        self._send(status, body, "application/json", send_body)

    def _send(self, status: int, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the process's own logs


class OpsServer:
    """One per process; ``port`` 0 binds an ephemeral port (logged, and written to
    ``port_file`` if given, so a supervisor or a test can find it)."""

    def __init__(
        self,
        metrics: MetricGroup,
        health: Health,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        port_file: str | os.PathLike[str] | None = None,
        process: str = "worker",
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self.requested_port = port
        self.port_file = Path(port_file) if port_file else None
        self.process = process
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._log = get_logger("ops_http")

    def start(self) -> int:
        try:
            server = _Server((self.host, self.requested_port), _Handler)
        except OSError as exc:
            # A taken or unusable address is a deployment error, not a transient one.
            raise ConfigError(
                f"cannot listen for metrics on {self.host}:{self.requested_port}: {exc} "
                "(set metrics.port, 0 for any free port, or metrics.enabled = false)"
            ) from exc
        server.metrics = self.metrics
        server.health = self.health
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="ops-http",
            daemon=True,
        )
        self._thread.start()
        if self.port_file is not None:
            write_port_file(self.port_file, self.port)
        self._log.info(
            "ops_http_listening",
            host=self.host,
            port=self.port,
            process=self.process,
            paths=["/metrics", "/healthz", "/readyz"],
        )
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class OpsListen:
    """Where a process serves its ops listener (``metrics.host``, ``metrics.port``...)."""

    host: str
    port: int
    port_file: str | None


@contextmanager
def serving_ops(
    metrics: MetricGroup,
    health: Health,
    listen: OpsListen | None,
    *,
    process: str,
    optional: bool = False,
) -> Iterator[OpsServer | None]:
    """Every long-running process serves ``/metrics``, ``/healthz`` and ``/readyz`` this
    way, for as long as the block runs; ``listen`` None (metrics disabled) serves nothing.

    A taken port is a ``ConfigError``, except where ``optional``: a nightly run is a batch
    job, so a taken port costs it its metrics (logged), not the run.
    """
    if listen is None:
        yield None
        return
    ops = OpsServer(
        metrics,
        health,
        host=listen.host,
        port=listen.port,
        port_file=listen.port_file,
        process=process,
    )
    try:
        ops.start()
    except ConfigError as exc:
        if not optional:
            raise
        get_logger("ops_http").warning(
            "metrics listener not started", process=process, error=str(exc)
        )
        yield None
        return
    try:
        yield ops
    finally:
        ops.stop()


def write_port_file(path: Path, port: int) -> None:
    """Write the bound port for a supervisor or a test to find (port 0 binds any)."""
    # Atomic, so a reader polling for the file never sees it half written. Not fsync'd: the
    # port is only true while this process runs, so a copy that survives a crash is stale
    # whether or not it reached the disk, and the fsyncs would cost 0.6 to 8 ms of startup.
    write_atomic(path, f"{port}\n".encode(), fsync=False)
