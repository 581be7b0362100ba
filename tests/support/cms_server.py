"""Run the CMS intake on a loopback port in a background thread, for synchronous tests.

The intake has its own event loop in the thread, so a test can drive it with the blocking
``CmsClient`` exactly as the CMS would.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine
from typing import Any, TypeVar

from producers.cms.app import Intake, serve
from tests.support.http import Background
from tests.support.waiting import wait_for

_T = TypeVar("_T")


class IntakeThread(Background):
    def __init__(self, intake: Intake, host: str = "127.0.0.1") -> None:
        self.intake = intake
        self.host = host
        self.port = 0
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._listening.wait(20) or self.error is not None:
            raise RuntimeError(f"the intake did not start: {self.error!r}")

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.intake, self.host, 0, stop=self._stop, on_listening=self._on_port)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._listening.set()

    def _on_port(self, port: int) -> None:
        self.port = port
        self._listening.set()

    def request_stop(self) -> None:
        """Ask for a graceful shutdown (as SIGTERM does) without waiting for it."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)

    def stop(self, timeout_s: float = 30) -> None:
        self.request_stop()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError("the intake did not stop")

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def call(self, coro: Coroutine[Any, Any, _T], timeout_s: float = 30) -> _T:
        """Run a coroutine on the intake's loop (its broker lives there)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout_s: float = 30) -> None:
        wait_for(lambda: self.get("/readyz")[0] == 200, timeout_s, "the intake to be ready")
