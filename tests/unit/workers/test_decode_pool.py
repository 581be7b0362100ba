"""The decode pool: results and errors cross the process boundary; a dead worker is
contained to the jobs it had in flight."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, Reason, TransientError
from workers.decode.pool import DecodePool, _crash_for_test


def jpeg_bytes(width_px: int = 640, height_px: int = 480) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height_px, width_px, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    with DecodePool(2) as decode_pool:
        yield decode_pool


def test_decode_sync_and_async(pool: DecodePool) -> None:
    data = jpeg_bytes()
    result = pool.decode_sync(data)
    assert result.pixels.shape == (224, 224, 3)
    assert result.format == "jpeg"

    async def decode_many() -> list[np.ndarray]:
        results = await asyncio.gather(*(pool.decode(data) for _ in range(6)))
        return [r.pixels for r in results]

    for pixels in asyncio.run(decode_many()):
        assert np.array_equal(pixels, result.pixels)


def test_permanent_errors_keep_their_reason(pool: DecodePool) -> None:
    with pytest.raises(PermanentError) as err:
        pool.decode_sync(b"<html></html>")
    assert err.value.reason == Reason.NOT_AN_IMAGE


def test_pool_options_reach_workers() -> None:
    data = jpeg_bytes()
    with DecodePool(1, size=64, recover_truncated=False) as small:
        assert small.decode_sync(data).pixels.shape == (64, 64, 3)
        with pytest.raises(PermanentError) as err:
            small.decode_sync(data[: len(data) // 2])
        assert err.value.reason == Reason.TRUNCATED


def test_worker_crash_is_transient_and_pool_recovers(pool: DecodePool) -> None:
    data = jpeg_bytes()
    restarts_before = pool.restarts
    with pytest.raises(TransientError) as err:
        pool._submit_raw(_crash_for_test).result(timeout=60)
    assert err.value.reason == Reason.DECODER_CRASHED
    assert pool.restarts == restarts_before + 1
    for _ in range(4):
        assert pool.decode_sync(data).pixels.shape == (224, 224, 3)


def test_async_crash_then_success(pool: DecodePool) -> None:
    data = jpeg_bytes()

    async def crash_then_decode() -> np.ndarray:
        with pytest.raises(TransientError) as err:
            await asyncio.wrap_future(pool._submit_raw(_crash_for_test))
        assert err.value.reason == Reason.DECODER_CRASHED
        return (await pool.decode(data)).pixels

    assert asyncio.run(crash_then_decode()).shape == (224, 224, 3)


def test_fork_is_refused() -> None:
    with pytest.raises(ValueError):
        DecodePool(1, start_method="fork")
