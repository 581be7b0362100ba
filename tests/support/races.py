"""Processes that race: each forked, all let go at the same moment."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def race_processes(target: Callable[..., T], *args: Any, processes: int = 4) -> list[T]:
    """``target(n, *args)`` in ``processes`` forked processes at once; results in order of n.

    ``target`` must be a module-level function (it is pickled by reference)."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(processes) as pool:
            results = [
                pool.apply_async(_when_let_go, (start, target, n, *args)) for n in range(processes)
            ]
            start.set()
            return [r.get(30) for r in results]


def _when_let_go(start: Any, target: Callable[..., T], n: int, *args: Any) -> T:
    start.wait()
    return target(n, *args)
