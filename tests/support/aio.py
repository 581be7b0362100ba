"""asyncio for synchronous tests: a test written as a coroutine, one question to a broker
over a fresh connection, and reading a delivery stream.

``run_async`` makes ``async def test_...`` a test pytest runs (each on a new event loop),
with its fixtures as the coroutine's parameters; ``ask`` connects a broker, awaits one
read of it and closes it; ``take`` and ``nothing_more`` read a consumer's stream.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar


class Connectable(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...


P = ParamSpec("P")
T = TypeVar("T")
D = TypeVar("D")
B = TypeVar("B", bound=Connectable)


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """The coroutine ``test`` as a plain test: run to its end on a new event loop."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def ask(broker: B, read: Callable[[B], Awaitable[T]]) -> T:
    """Connect ``broker``, return what ``read`` answers from it, and close it."""

    async def go() -> T:
        await broker.connect()
        try:
            return await read(broker)
        finally:
            await broker.close()

    return asyncio.run(go())


async def take(stream: AsyncIterator[D], n: int, timeout_s: float = 30.0) -> list[D]:
    """The next ``n`` items of ``stream``; fails after ``timeout_s``."""

    async def go() -> list[D]:
        return [await anext(stream) for _ in range(n)]

    return await asyncio.wait_for(go(), timeout_s)


async def nothing_more(stream: AsyncIterator[Any], wait_s: float = 1.0) -> bool:
    """Whether no item came within ``wait_s``; the wait ends the stream (consume anew)."""
    try:
        await asyncio.wait_for(anext(stream), wait_s)
    except TimeoutError:
        return True
    return False
