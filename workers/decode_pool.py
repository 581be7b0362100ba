"""A process pool for CPU decode that survives its workers dying.

Decoding runs in processes, not threads: Pillow/libjpeg release the GIL only in parts, and a
decoder crash (a segfault in a native codec) must cost one job, not the worker.

Workers are started with "spawn" by default: the parent has torch (and CUDA) loaded, and
forking a process with live CUDA state or foreign threads is unsafe. A spawned child
re-imports the parent's ``__main__`` module, so the entry point must keep heavy imports
under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, TypeVar

from common.errors import Reason, TransientError
from workers.decode import DEFAULT_MAX_PIXELS, DecodeResult, decode_image
from workers.preprocess import INPUT_SIZE

T = TypeVar("T")


def _crash_for_test() -> None:
    """Kill the worker process the way a native decoder crash would (no cleanup)."""
    os._exit(1)


def _ready() -> bool:
    # Held long enough that each warm-up call lands on a different process.
    time.sleep(0.05)
    return True


class DecodePool:
    def __init__(
        self,
        processes: int,
        *,
        size: int = INPUT_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        recover_truncated: bool = True,
        start_method: str = "spawn",
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if start_method == "fork":
            raise ValueError("fork is unsafe in a process that has torch/CUDA loaded")
        self.processes = processes
        self.size = size
        self.max_pixels = max_pixels
        self.recover_truncated = recover_truncated
        self._mp_context = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._closed = False
        self._executor = self._new_executor()
        self.restarts = 0  # how many times a dead worker forced a new executor

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.processes, mp_context=self._mp_context)

    async def decode(self, data: bytes) -> DecodeResult:
        return await asyncio.wrap_future(self._submit_raw(self._decode_args(), data))

    def decode_sync(self, data: bytes) -> DecodeResult:
        return self._submit_raw(self._decode_args(), data).result()

    def _decode_args(self) -> Callable[[bytes], DecodeResult]:
        # A partial of a module-level function pickles by reference: cheap to send per job.
        return partial(
            decode_image,
            size=self.size,
            max_pixels=self.max_pixels,
            recover_truncated=self.recover_truncated,
        )

    def _submit_raw(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` in a worker; a dead worker surfaces as DECODER_CRASHED.

        Returns a future of our own so that the BrokenProcessPool translation and the
        executor replacement happen once, whoever waits on it (sync or asyncio).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("DecodePool is closed")
            executor = self._executor
            try:
                inner = executor.submit(fn, *args)
            except BrokenProcessPool:
                # The pool broke before anyone collected a result; this job was never in
                # flight, so it gets a fresh executor rather than an error.
                executor = self._replace_locked(executor)
                inner = executor.submit(fn, *args)
        outer: Future[T] = Future()
        outer.set_running_or_notify_cancel()
        inner.add_done_callback(lambda done: self._settle(executor, done, outer))
        return outer

    def _settle(self, executor: ProcessPoolExecutor, inner: Future[T], outer: Future[T]) -> None:
        # Runs on the executor's management thread (or the submitter's, if already done).
        if inner.cancelled():
            outer.set_exception(TransientError("decode cancelled", Reason.DECODER_CRASHED))
            return
        exc = inner.exception()
        if isinstance(exc, BrokenProcessPool):
            with self._lock:
                if not self._closed:
                    self._replace_locked(executor)
            crashed = TransientError(
                "a decode worker process died while this job was in flight",
                Reason.DECODER_CRASHED,
            )
            crashed.__cause__ = exc
            outer.set_exception(crashed)
        elif exc is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(inner.result())

    def _replace_locked(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """Swap in a new executor unless another job already did; caller holds the lock."""
        if self._executor is broken:
            # No shutdown() on the broken one: its management thread is tearing it down
            # itself, and this may be running on that very thread.
            self._executor = self._new_executor()
            self.restarts += 1
        return self._executor

    async def warm_up(self) -> None:
        """Start every process now (imports take seconds) instead of on the first jobs."""
        await asyncio.gather(
            *(asyncio.wrap_future(self._submit_raw(_ready)) for _ in range(self.processes))
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor = self._executor
        executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
