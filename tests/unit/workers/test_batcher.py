"""Dynamic batching, batch statistics, padding plans and per-sample failure isolation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from workers.batcher import (
    BATCH_STATS,
    BatchStats,
    Chunk,
    embed_isolating,
    next_batch,
    pad_rows,
    plan_chunks,
)

SHAPE = (8, 8, 3)


def test_batch_fills_or_times_out() -> None:
    async def scenario() -> None:
        q: asyncio.Queue[int] = asyncio.Queue()
        for i in range(10):
            q.put_nowait(i)
        stats = BatchStats()
        assert await next_batch(q, 4, 1.0, stats=stats) == [0, 1, 2, 3]
        rest = await next_batch(q, 100, 0.1, stats=stats)
        assert rest == [4, 5, 6, 7, 8, 9]
        # A batch that is not full closes only when its wait is over.
        assert stats.last_wait_s >= 0.1

        async def late() -> None:
            await asyncio.sleep(0.02)
            q.put_nowait(99)

        q.put_nowait(98)
        task = asyncio.create_task(late())
        assert await next_batch(q, 2, 1.0, stats=stats) == [98, 99]
        await task
        assert (stats.batches, stats.items) == (3, 12)
        assert (stats.full_batches, stats.timed_out_batches) == (2, 1)
        assert stats.size_counts == {4: 1, 6: 1, 2: 1}
        assert stats.as_dict()["last_size"] == 2

    asyncio.run(scenario())


def test_batch_stats_fill_and_default_sink() -> None:
    stats = BatchStats()
    assert stats.mean_fill == 0.0 and stats.mean_wait_s == 0.0
    stats.record(8, 32, 0.05)
    stats.record(32, 32, 0.01)
    assert stats.mean_fill == pytest.approx(40 / 64)
    assert stats.mean_wait_s == pytest.approx(0.03)

    async def one() -> list[int]:
        q: asyncio.Queue[int] = asyncio.Queue()
        q.put_nowait(1)
        return await next_batch(q, 1, 0.0)

    before = BATCH_STATS.batches
    assert asyncio.run(one()) == [1]
    assert BATCH_STATS.batches == before + 1  # callers that pass no stats still count


def test_plan_pads_to_preferred_sizes_and_splits_large_batches() -> None:
    assert plan_chunks(5, (1, 2, 4, 8), 32) == [Chunk(0, 5, 8)]
    assert plan_chunks(8, (1, 2, 4, 8), 32) == [Chunk(0, 8, 8)]
    assert plan_chunks(19, (4, 8), 32) == [Chunk(0, 8, 8), Chunk(8, 16, 8), Chunk(16, 19, 4)]
    assert plan_chunks(1, (4, 8), 32) == [Chunk(0, 1, 4)]
    # Without preferred sizes: no padding, chunks of at most max_chunk.
    assert plan_chunks(70, (), 32) == [Chunk(0, 32, 32), Chunk(32, 64, 32), Chunk(64, 70, 6)]
    assert plan_chunks(0, (4,), 32) == []
    with pytest.raises(ValueError):
        plan_chunks(3, (), 0)


def test_pad_rows_appends_zero_rows() -> None:
    batch = np.full((3, *SHAPE), 7, np.uint8)
    padded = pad_rows(batch, 4)
    assert padded.shape == (4, *SHAPE)
    assert (padded[:3] == 7).all() and (padded[3] == 0).all()
    assert pad_rows(batch, 3) is batch


def _mean_embed(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: raises on any stack holding an all-255 sample (a poison input)."""
    if (batch.reshape(len(batch), -1) == 255).all(axis=1).any():
        raise RuntimeError("model blew up")
    return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)


def test_one_bad_sample_never_fails_its_batch() -> None:
    samples: list[np.ndarray | None] = [np.full(SHAPE, i, np.uint8) for i in range(9)]
    samples[2] = np.zeros((4, 4, 3), np.uint8)  # wrong shape: fails before stacking
    samples[5] = None  # decode produced nothing
    samples[7] = np.full(SHAPE, 255, np.uint8)  # breaks the model
    calls: list[int] = []

    def embed(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return _mean_embed(batch)

    result = embed_isolating(embed, samples, shape=SHAPE)
    assert sorted(result.errors) == [2, 5, 7]
    assert isinstance(result.errors[7], RuntimeError)
    assert "expected uint8" in str(result.errors[2])
    assert sorted(result.vectors) == [0, 1, 3, 4, 6, 8]
    for index, vector in result.vectors.items():
        assert vector[0] == pytest.approx(index)
    # Bisection, not one call per sample: 6 good samples cost well under 2 * 6 calls.
    assert calls[0] == 7 and len(calls) < 12


def test_isolating_a_clean_batch_is_one_call() -> None:
    samples = [np.full(SHAPE, i, np.uint8) for i in range(4)]
    calls: list[int] = []

    def embed(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return _mean_embed(batch)

    result = embed_isolating(embed, samples, shape=SHAPE)
    assert calls == [4] and not result.errors and len(result.vectors) == 4
