"""A loopback HTTP server for tests, served from a thread for the life of a block."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def serving(server: http.server.HTTPServer) -> Iterator[str]:
    """Serve ``server`` from a daemon thread; yields its base URL; shuts it down after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
