"""Pixels come back from the pool through shared memory, and a crash frees its slot."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, TransientError
from workers.decode.cpu import decode_image
from workers.decode.pool import DecodePool, _crash_for_test


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


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
    with DecodePool(1, shared_slots=1) as pool:
        first = pool.decode_sync(jpeg_bytes(1))
        kept = first.pixels.copy()
        pool.decode_sync(jpeg_bytes(2))  # reuses the one slot
        assert np.array_equal(first.pixels, kept)


def test_errors_and_crashes_give_the_slot_back() -> None:
    with DecodePool(1, shared_slots=1) as pool:
        with pytest.raises(PermanentError):
            pool.decode_sync(b"<html>")
        assert pool._slots is not None and pool._slots._free == [0]
        with pytest.raises(TransientError):
            pool._submit_raw(_crash_for_test).result(timeout=60)
        assert pool.decode_sync(jpeg_bytes(3)).pixels.shape == (224, 224, 3)
        assert pool._slots._free == [0]


def test_pool_passes_the_minimum_decoded_fraction() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8)).save(
        buf, "JPEG"
    )
    cut = buf.getvalue()[: len(buf.getvalue()) // 4]
    with DecodePool(1, min_decoded_fraction=0.9) as strict, pytest.raises(PermanentError):
        strict.decode_sync(cut)
    with DecodePool(1, min_decoded_fraction=0.0) as lenient:
        assert lenient.decode_sync(cut).recovered
