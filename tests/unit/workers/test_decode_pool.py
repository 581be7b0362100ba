"""The decode pool: results and errors cross the process boundary, pixels come back
through shared memory, a dead worker is contained to the jobs it had in flight, and a pool
that keeps dying is given up (the worker must exit, not spin).

Every test runs its own pool or the module's, or one spawned process. A process whose
parent dies exits (the ``kill -9`` of a whole worker is in
``tests/integration/test_worker_orphans.py``).
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess

import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, Reason, TransientError, UnrecoverableError
from tests.support.decode_pool_hooks import (
    HANG,
    HangingDecodePool,
    HookedDecodePool,
    arm_then_sleep,
    parent_death_signal,
    ping,
)
from workers.decode.cpu import decode_image
from workers.decode.parent_watch import ORPHANED_EXIT_CODE, ChildWatch, ParentWatch
from workers.decode.pool import DecodePool
from workers.decode.preprocess import Preprocess
from workers.decode.types import DecodeResult


def jpeg_bytes(seed: int = 1, width_px: int = 640, height_px: int = 480) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height_px, width_px, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool() -> Iterator[HookedDecodePool]:
    with HookedDecodePool(2) as decode_pool:
        yield decode_pool


# -- results and errors ----------------------------------------------------------------


def test_decode_sync_and_async(pool: HookedDecodePool) -> None:
    data = jpeg_bytes()
    result = pool.decode_sync(data)
    assert result.pixels.shape == (224, 224, 3)
    assert result.format == "jpeg"

    async def decode_many() -> list[np.ndarray]:
        results = await asyncio.gather(*(pool.decode(data) for _ in range(6)))
        return [r.pixels for r in results]

    for pixels in asyncio.run(decode_many()):
        assert np.array_equal(pixels, result.pixels)


def test_permanent_errors_keep_their_reason(pool: HookedDecodePool) -> None:
    with pytest.raises(PermanentError) as err:
        pool.decode_sync(b"<html></html>")
    assert err.value.reason == Reason.NOT_AN_IMAGE


def test_pool_options_reach_workers() -> None:
    data = jpeg_bytes()
    with HookedDecodePool(1, preprocess=Preprocess(64), recover_truncated=False) as small:
        assert small.decode_sync(data).pixels.shape == (64, 64, 3)
        with pytest.raises(PermanentError) as err:
            small.decode_sync(data[: len(data) // 2])
        assert err.value.reason == Reason.TRUNCATED


def test_pool_passes_the_minimum_decoded_fraction() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8)).save(
        buf, "JPEG"
    )
    cut = buf.getvalue()[: len(buf.getvalue()) // 4]
    with HookedDecodePool(1, min_decoded_fraction=0.9) as strict, pytest.raises(PermanentError):
        strict.decode_sync(cut)
    with HookedDecodePool(1, min_decoded_fraction=0.0) as lenient:
        assert lenient.decode_sync(cut).recovered


def test_fork_and_forkserver_are_refused() -> None:
    with pytest.raises(ValueError, match="unsafe"):
        DecodePool(1, start_method="fork")
    with pytest.raises(ValueError, match="forkserver"):
        DecodePool(1, start_method="forkserver")


# -- shared memory ---------------------------------------------------------------------


def test_results_come_back_through_shared_memory_and_match_in_process() -> None:
    images = [jpeg_bytes(seed) for seed in range(6)]
    with DecodePool(2, shared_slots=2) as pool:

        async def many() -> list[np.ndarray]:
            # 12 jobs on 2 slots: most go through shared memory, the rest fall back.
            results = await asyncio.gather(*(pool.decode(d) for d in images * 2))
            return [r.pixels for r in results]

        decoded = asyncio.run(many())
        assert pool.shared_returns >= 2
        assert sorted(pool._slots._free) == [0, 1]  # type: ignore[union-attr]
    for data, pixels in zip(images * 2, decoded, strict=True):
        assert pixels.flags["C_CONTIGUOUS"]
        assert np.array_equal(pixels, decode_image(data).pixels)


def test_results_do_not_alias_the_slot() -> None:
    with HookedDecodePool(1, shared_slots=1) as pool:
        first = pool.decode_sync(jpeg_bytes(1))
        kept = first.pixels.copy()
        pool.decode_sync(jpeg_bytes(2))  # reuses the one slot
        assert np.array_equal(first.pixels, kept)


def test_errors_and_crashes_give_the_slot_back() -> None:
    with HookedDecodePool(1, shared_slots=1) as pool:
        with pytest.raises(PermanentError):
            pool.decode_sync(b"<html>")
        assert pool._slots is not None and pool._slots._free == [0]
        with pytest.raises(TransientError):
            pool.crash_a_worker().result(timeout=60)
        assert pool.decode_sync(jpeg_bytes(3)).pixels.shape == (224, 224, 3)
        assert pool._slots._free == [0]


# -- crashes ---------------------------------------------------------------------------


def test_worker_crash_is_transient_and_pool_recovers(pool: HookedDecodePool) -> None:
    data = jpeg_bytes()
    restarts_before = pool.restarts
    with pytest.raises(TransientError) as err:
        pool.crash_a_worker().result(timeout=60)
    assert err.value.reason == Reason.DECODER_CRASHED
    assert pool.restarts == restarts_before + 1
    for _ in range(4):
        assert pool.decode_sync(data).pixels.shape == (224, 224, 3)


def test_async_crash_then_success(pool: HookedDecodePool) -> None:
    data = jpeg_bytes()

    async def crash_then_decode() -> np.ndarray:
        with pytest.raises(TransientError) as err:
            await asyncio.wrap_future(pool.crash_a_worker())
        assert err.value.reason == Reason.DECODER_CRASHED
        return (await pool.decode(data)).pixels

    assert asyncio.run(crash_then_decode()).shape == (224, 224, 3)


def test_restarts_in_a_row_give_up_and_a_success_resets_the_count() -> None:
    restarts: list[int] = []
    with HookedDecodePool(1, max_restarts=2, on_restart=lambda: restarts.append(1)) as pool:
        with pytest.raises(TransientError):
            pool.crash_a_worker().result(60)
        assert pool.run_in_worker(ping).result(60) is True  # the new pool works...
        assert pool.restarts_in_a_row == 0  # ...which resets the count
        with pytest.raises(TransientError):
            pool.crash_a_worker().result(60)
        # The second death in a row reaches the limit: the in-flight job is not blamed
        # (no decoder_crashed retry), and nothing more is submitted.
        with pytest.raises(UnrecoverableError) as failure:
            pool.crash_a_worker().result(60)
        assert failure.value.component == "decode_pool"
        assert pool.failed
        with pytest.raises(UnrecoverableError):
            pool.run_in_worker(ping)
    assert len(restarts) == pool.restarts == 3


# -- the parent's death ----------------------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


@linux_only
def test_processes_spawned_by_the_main_thread_die_with_their_parent(
    pool: HookedDecodePool,
) -> None:
    assert pool.run_in_worker(parent_death_signal).result(60) == signal.SIGKILL


@linux_only
def test_processes_spawned_by_a_passing_thread_outlive_that_thread() -> None:
    # The kernel sends the parent-death signal when the spawning *thread* exits: armed
    # here, the pool's process would die with the thread that first used the pool.
    with HookedDecodePool(1) as pool:
        spawner = threading.Thread(target=lambda: pool.run_in_worker(ping).result(60))
        spawner.start()
        spawner.join()
        time.sleep(0.5)  # a signal, had one been armed, lands as the thread finishes exiting
        assert pool.run_in_worker(parent_death_signal).result(60) == 0
        assert pool.restarts == 0


@contextmanager
def _armed_process(watch: ParentWatch | ChildWatch) -> Iterator[BaseProcess]:
    """A spawned process that arms ``watch`` and then sleeps 60 s."""
    child = multiprocessing.get_context("spawn").Process(target=arm_then_sleep, args=(watch, 60))
    child.start()
    try:
        yield child
    finally:
        if child.is_alive():
            child.kill()


def test_a_process_exits_when_its_parents_end_of_the_pipe_closes() -> None:
    # What the kernel does for a parent that dies, however it dies (the portable guard).
    watch = ParentWatch()
    with _armed_process(watch) as child:
        watch.close()
        child.join(30)
        assert child.exitcode == ORPHANED_EXIT_CODE


def test_a_process_whose_parent_died_before_it_armed_exits() -> None:
    # As if the parent had died before arming: its recorded pid is not the real parent's.
    # The real one lives on and keeps the pipe open, so only the pid check can end it.
    reader, writer = multiprocessing.Pipe(duplex=False)
    with _armed_process(ChildWatch(reader, parent_pid=os.getppid(), death_signal=False)) as child:
        child.join(30)
        assert child.exitcode == ORPHANED_EXIT_CODE
    writer.close()


def test_a_hung_decode_is_stopped_the_image_refused_and_the_pool_replaced() -> None:
    good = jpeg_bytes()
    with HangingDecodePool(2, timeout_s=1.0) as pool:

        async def both() -> list[DecodeResult | BaseException]:
            return await asyncio.gather(
                pool.decode(HANG + good), pool.decode(good), return_exceptions=True
            )

        started = time.monotonic()
        hung, beside = asyncio.run(both())
        assert time.monotonic() - started < 10
        assert isinstance(hung, PermanentError) and hung.reason is Reason.UNDECODABLE
        assert "longer than 1 s" in str(hung)
        # The job beside it either finished first or was caught in the restart: retried.
        assert isinstance(beside, DecodeResult) or (
            isinstance(beside, TransientError) and beside.reason is Reason.DECODER_CRASHED
        )
        assert pool.timeouts == 1
        after = asyncio.run(pool.decode(good))  # new processes took over
        assert after.pixels.shape == (224, 224, 3) and pool.restarts >= 1
