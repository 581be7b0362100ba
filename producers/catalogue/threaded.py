"""Read a blocking iterable (a catalogue on disk or S3) on a thread, in chunks.

The event loop keeps serving broker confirms while a read waits on the network; a bounded
queue of chunks keeps the reader at most ``depth`` chunks ahead.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()
_EMPTY = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def chunks_in_thread(
    source: Iterable[T], *, chunk_rows: int = 1000, depth: int = 4
) -> AsyncGenerator[list[T], None]:
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            chunk: list[T] = []
            for entry in source:
                chunk.append(entry)
                if len(chunk) >= chunk_rows:
                    if not put(chunk):
                        return
                    chunk = []
            if chunk and not put(chunk):
                return
            put(_DONE)
        except BaseException as exc:  # handed to the reader of the chunks, raised there
            put(_Failed(exc))

    def take() -> Any:
        # A timeout, so an executor thread never outlives a cancelled consumer for long.
        try:
            return handoff.get(timeout=0.2)
        except queue.Empty:
            return _EMPTY

    thread = threading.Thread(target=read, name="catalogue-reader", daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    try:
        while True:
            item = await loop.run_in_executor(None, take)
            if item is _EMPTY:
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        await loop.run_in_executor(None, thread.join)
