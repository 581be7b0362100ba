"""Loopback servers for tests, each run from a thread for the life of a ``with`` block.

``serving`` serves a standard-library ``HTTPServer``; ``Background`` is the base of the
servers that run an event loop of their own (the CMS intake, the TCP proxy): ``start``
brings one up, ``stop`` takes it down, and ``with`` does both.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import Self


class Background:
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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
