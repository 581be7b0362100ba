"""Test hooks for ``workers.decode.pool.DecodePool``, kept out of the production package.

``HookedDecodePool`` is a ``DecodePool`` that tests can also make run any function in one
of its processes (``run_in_worker``), crash a process the way a native decoder crash would
(``crash_a_worker``), and decode without an event loop (``decode_sync``). Each goes through
the pool's own submission path, so crashes are translated and the executor replaced
exactly as for a real decode.

Functions sent to a process must be importable there: module-level functions (like
``crash_worker`` and ``ping`` below) pickle by reference.

``parent_death_signal`` and ``arm_then_sleep`` look at ``workers.decode.parent_watch`` from
inside a process: the signal it was armed with, and how it exits once its parent is gone.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

from workers.decode.cpu import decode_image
from workers.decode.parent_watch import ChildWatch
from workers.decode.pool import DecodePool
from workers.decode.types import DecodeResult

T = TypeVar("T")


def crash_worker() -> None:
    """Kill the pool process the way a native decoder crash would (no cleanup)."""
    os._exit(1)


def ping() -> bool:
    """A job that always succeeds: the pool's processes are working."""
    return True


_PR_GET_PDEATHSIG = 2  # <linux/prctl.h>


def parent_death_signal() -> int:
    """The signal this process gets when its parent dies; 0 for none (Linux only)."""
    sig = ctypes.c_int(-1)
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(sig)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_PDEATHSIG) failed")
    return sig.value


def arm_then_sleep(watch: ChildWatch, sleep_s: float) -> None:
    """A process target: arm the watch as a decode process does, then idle (exit 0)."""
    watch.arm()
    time.sleep(sleep_s)


HANG = b"HANG"  # bytes that make decode_or_hang block, as a decoder stuck in native code


def decode_or_hang(data: bytes, **options: Any) -> DecodeResult:
    """``decode_image``, except that bytes starting with ``HANG`` never return."""
    if data.startswith(HANG):
        time.sleep(3600)
    return decode_image(data, **options)


class HookedDecodePool(DecodePool):
    def run_in_worker(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """``fn(*args)`` in a pool process; a dead process surfaces as DECODER_CRASHED."""
        return self._submit_raw(fn, *args)

    def crash_a_worker(self) -> Future[None]:
        return self.run_in_worker(crash_worker)

    def decode_sync(self, data: bytes) -> DecodeResult:
        return self._submit_decode(data).result()


class HangingDecodePool(HookedDecodePool):
    """A pool whose processes decode with ``decode_or_hang``."""

    def _decode_args(self) -> Callable[[bytes], DecodeResult]:
        base = super()._decode_args()
        assert isinstance(base, partial)
        return partial(decode_or_hang, **base.keywords)
