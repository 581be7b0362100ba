"""A process pool for CPU decode that survives its workers dying.

Decoding runs in processes, not threads: Pillow/libjpeg release the GIL only in parts, and a
decoder crash (a segfault in a native codec) must cost one job, not the worker.

Pixels come back through shared memory: the parent owns one block cut into fixed slots
(one ``size`` x ``size`` x 3 array each); a job borrows a slot, the child writes its result
there and returns only the small metadata, and the parent copies the slot out once and
frees it. Pickling the array instead costs a copy into the pickle, the pipe transfer and a
copy out. When every slot is busy (more jobs in flight than slots) a job falls back to the
pickled return, so the pool never blocks on slots.

Workers are started with "spawn", the only start method accepted: the parent has torch
(and CUDA) loaded, and forking a process with live CUDA state or foreign threads is unsafe;
a forkserver's children are not ours to watch (below). A spawned child
re-imports the parent's ``__main__`` module, so the entry point must keep heavy imports
under ``if __name__ == "__main__"``. Each child repeats the parent's logging set-up (format,
level, masked secrets, worker id), so its lines look like the parent's.

The processes never outlive this one: each exits the moment its parent is gone, SIGKILL
included (``parent_watch``), so multiprocessing's resource tracker, which waits for every
one of them, exits too and unlinks the slot block and the queues' semaphores from /dev/shm.

A pool that keeps dying is not restarted forever: after ``max_restarts`` restarts in a
row with no decode completing in between, every decode raises ``UnrecoverableError`` and
the worker exits for its orchestrator to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from functools import partial
from multiprocessing import shared_memory
from typing import Any, TypeVar, cast

import numpy as np

import common.defaults as defaults
from common.errors import PermanentError, Reason, TransientError, UnrecoverableError
from common.observability.logging import apply_logging_config, get_logger, logging_config
from workers.decode.cpu import DEFAULT_MAX_PIXELS, configure_decoder_threads, decode_image
from workers.decode.limits import IN_FLIGHT_PER_PROCESS
from workers.decode.parent_watch import ChildWatch, ParentWatch
from workers.decode.preprocess import DEFAULT_PREPROCESS, Preprocess
from workers.decode.types import DecodeResult

T = TypeVar("T")


# glibc mallopt parameters. Decoding allocates and frees buffers of several MB per image;
# by default glibc maps each one fresh (and the kernel zeroes every page of it), which made
# a decode in a pool process about 20% slower than the same decode in a long-lived process.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_MAX_BLOCK_BYTES = 32 * 2**20  # above this (a ~10 MP RGB buffer) still mmap
_HEAP_KEEP_BYTES = 128 * 2**20  # free heap a process keeps instead of returning it


def _tune_malloc() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MAX_BLOCK_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _init_child(log_config: dict[str, Any] | None = None, watch: ChildWatch | None = None) -> None:
    if watch is not None:
        watch.arm()  # first: a process whose parent is gone does nothing else
    if log_config is not None:
        apply_logging_config(log_config, process="decode", pid=os.getpid())
    configure_decoder_threads()
    _tune_malloc()


def _ready() -> bool:
    # Held long enough that each warm-up call lands on a different process.
    time.sleep(0.05)
    return True


# Shared-memory blocks this child process has attached, by name (attach once, reuse).
_attached: dict[str, shared_memory.SharedMemory] = {}
_EMPTY_PIXELS = np.zeros((0, 0, 3), np.uint8)


def _decode_into_slot(
    decode: Callable[[bytes], DecodeResult], shm_name: str, offset: int, data: bytes
) -> DecodeResult:
    """Child side: decode, write the pixels into the parent's slot, return metadata only."""
    result = decode(data)
    block = _attached.get(shm_name)
    if block is None:
        block = _attached[shm_name] = shared_memory.SharedMemory(name=shm_name)
    pixels = result.pixels
    slot = np.ndarray(pixels.shape, np.uint8, buffer=block.buf, offset=offset)
    slot[...] = pixels
    return replace(result, pixels=_EMPTY_PIXELS)


class _Slots:
    """Fixed-size slots in one shared-memory block, handed out and returned thread-safely."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.block = shared_memory.SharedMemory(create=True, size=max(count * slot_bytes, 1))
        self._count = count
        self._free = list(range(count))
        self._lock = threading.Lock()

    def taken(self) -> int:
        with self._lock:
            return self._count - len(self._free)

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def copy_out(self, slot: int, shape: tuple[int, int, int]) -> np.ndarray:
        view = np.ndarray(shape, np.uint8, buffer=self.block.buf, offset=slot * self.slot_bytes)
        return view.copy()  # the one copy: the slot is reused as soon as it is given back

    def close(self) -> None:
        self.block.close()
        self.block.unlink()


class DecodePool:
    def __init__(
        self,
        processes: int,
        *,
        preprocess: Preprocess = DEFAULT_PREPROCESS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        recover_truncated: bool = True,
        min_decoded_fraction: float = 0.0,
        shrink_on_load: bool = True,
        start_method: str = "spawn",
        shared_slots: int | None = None,
        max_restarts: int = defaults.DECODE_POOL_MAX_RESTARTS,
        on_restart: Callable[[], None] | None = None,
        timeout_s: float = defaults.DECODE_TIMEOUT_S,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if start_method == "fork":
            raise ValueError("fork is unsafe in a process that has torch/CUDA loaded")
        if start_method != "spawn":
            # A forkserver's children are the server's: the parent-death guards, which
            # watch this process, would see a stranger for a parent and exit at start.
            raise ValueError(f"decode processes are spawned; {start_method!r} is not supported")
        self.processes = processes
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.recover_truncated = recover_truncated
        self.min_decoded_fraction = min_decoded_fraction
        self.shrink_on_load = shrink_on_load
        self.timeout_s = timeout_s
        self.timeouts = 0  # decodes stopped for running past timeout_s
        # What the pipeline keeps in flight, plus headroom; beyond it results are pickled.
        self._slot_count = (
            processes * (IN_FLIGHT_PER_PROCESS + 2) if shared_slots is None else shared_slots
        )
        self._slots = self._new_slots(preprocess)
        self.shared_returns = 0  # results that came back through shared memory
        self._mp_context = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._closed = False
        self._log_config = logging_config()
        # Ends every process of this pool, and of the executors that replace it, when
        # this process dies (kill -9 included), so the resource tracker sees them go and
        # unlinks the slot block (parent_watch.py).
        self._parent_watch = ParentWatch()
        self._executor = self._new_executor()
        self.restarts = 0  # how many times a dead worker forced a new executor
        self.max_restarts = max_restarts
        self.restarts_in_a_row = 0  # since the last decode that completed
        self._on_restart = on_restart
        self._log = get_logger("decode_pool")

    def _new_slots(self, preprocess: Preprocess) -> _Slots | None:
        slot_bytes = preprocess.size * preprocess.size * 3
        return _Slots(self._slot_count, slot_bytes) if self._slot_count > 0 else None

    def set_preprocess(self, preprocess: Preprocess) -> None:
        """Decode for ``preprocess`` from now on: the model's, known once it has loaded
        (the processes start beside the model load). Only before the first decode."""
        if preprocess == self.preprocess:
            return
        with self._lock:
            old = self._slots
            if old is not None and old.taken():
                raise RuntimeError("set_preprocess while decodes are in flight")
            self.preprocess = preprocess
            self._slots = self._new_slots(preprocess)
        if old is not None:
            old.close()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=self._mp_context,
            initializer=_init_child,
            # Each process receives a ChildWatch in place of the ParentWatch (__reduce__).
            initargs=(self._log_config, cast(ChildWatch, self._parent_watch)),
        )

    @property
    def failed(self) -> bool:
        """True once the pool has died ``max_restarts`` times in a row: it is given up."""
        return self.restarts_in_a_row >= self.max_restarts

    def _given_up(self) -> UnrecoverableError:
        return UnrecoverableError(
            f"the decode pool died {self.restarts_in_a_row} times in a row without "
            "completing a decode; giving up",
            "decode_pool",
        )

    async def decode(self, data: bytes) -> DecodeResult:
        """One image, within ``timeout_s``: a decoder still busy then is stuck in native code
        (no Python-level interrupt reaches it), so the pool's processes are killed and
        replaced, this image fails as undecodable and the jobs beside it are retried."""
        future = self._submit_decode(data)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            self._stop_hung_processes()
            raise PermanentError(
                f"decoding took longer than {self.timeout_s:g} s; the decoder was stopped",
                Reason.UNDECODABLE,
            ) from None

    def _stop_hung_processes(self) -> None:
        # ProcessPoolExecutor cannot stop one task: kill its processes and swap in a new
        # executor now, so the next jobs do not land on the dying one; the jobs that were
        # in flight there settle through the crash path (_settle) as after a native crash.
        with self._lock:
            executor = self._executor
            self.timeouts += 1
            if not self._closed:
                self._replace_locked(executor)
        self._log.error("decode timed out; decode processes restarted", timeout_s=self.timeout_s)
        for process in list(getattr(executor, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                process.kill()

    def _decode_args(self) -> Callable[[bytes], DecodeResult]:
        # A partial of a module-level function pickles by reference: cheap to send per job.
        return partial(
            decode_image,
            preprocess=self.preprocess,
            max_pixels=self.max_pixels,
            recover_truncated=self.recover_truncated,
            min_decoded_fraction=self.min_decoded_fraction,
            shrink_on_load=self.shrink_on_load,
        )

    def _submit_decode(self, data: bytes) -> Future[DecodeResult]:
        slots = self._slots
        slot = slots.take() if slots is not None else None
        if slots is None or slot is None:
            return self._submit_raw(self._decode_args(), data)
        inner = self._submit_raw(
            _decode_into_slot, self._decode_args(), slots.block.name, slot * slots.slot_bytes, data
        )
        outer: Future[DecodeResult] = Future()
        outer.set_running_or_notify_cancel()

        def settle(done: Future[DecodeResult]) -> None:
            try:
                exc = done.exception()
                if exc is not None:
                    outer.set_exception(exc)
                    return
                meta = done.result()
                side = self.preprocess.size
                shape = (side, side, 3)
                outer.set_result(replace(meta, pixels=slots.copy_out(slot, shape)))
                self.shared_returns += 1
            finally:
                slots.give(slot)

        inner.add_done_callback(settle)
        return outer

    def _submit_raw(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` in a worker; a dead worker surfaces as DECODER_CRASHED.

        Returns a future of our own so that the BrokenProcessPool translation and the
        executor replacement happen once, whoever waits on it (sync or asyncio).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("DecodePool is closed")
            if self.failed:
                raise self._given_up()
            executor = self._executor
            try:
                try:
                    inner = executor.submit(fn, *args)
                except BrokenProcessPool:
                    # The pool broke before anyone collected a result; this job was never
                    # in flight, so it gets a fresh executor rather than an error.
                    executor = self._replace_locked(executor)
                    inner = executor.submit(fn, *args)
            except (BrokenProcessPool, OSError) as exc:
                # Processes could not be started (fork limit, memory): count it like a
                # crash, so a pool that cannot start at all is given up.
                self._replace_locked(executor)
                if self.failed:
                    raise self._given_up() from exc
                raise TransientError(
                    f"could not start decode processes: {exc}", Reason.DECODER_CRASHED
                ) from exc
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
                failed = self.failed
            crashed: Exception = (
                self._given_up()
                if failed
                else TransientError(
                    "a decode worker process died while this job was in flight",
                    Reason.DECODER_CRASHED,
                )
            )
            crashed.__cause__ = exc
            outer.set_exception(crashed)
            return
        # A result or an error raised by the decoder: the processes work.
        self.restarts_in_a_row = 0
        if exc is not None:
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
            self.restarts_in_a_row += 1
            self._log.warning(
                "decode pool restarted",
                restarts=self.restarts,
                restarts_in_a_row=self.restarts_in_a_row,
                max_restarts=self.max_restarts,
            )
            if self._on_restart is not None:
                self._on_restart()
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
        self._parent_watch.close()
        if self._slots is not None:
            self._slots.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
