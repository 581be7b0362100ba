"""Dynamic batching: up to ``max_batch`` items or ``max_wait_s``, whichever comes first.

Also the two batch-shaping helpers around it: ``plan_chunks`` (pad to the engine's
preferred batch sizes, split what is larger) and ``embed_isolating`` (one bad sample
never fails its batch). ``BatchStats`` are plain counters a metrics exporter reads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class BatchStats:
    """Batch fill and wait counters; monotonic, so a scraper turns them into rates."""

    batches: int = 0
    items: int = 0
    full_batches: int = 0  # closed because max_batch was reached
    timed_out_batches: int = 0  # closed because max_wait_s ran out
    wait_s_total: float = 0.0  # first item -> batch closed, summed
    max_batch: int = 0  # the last batch's limit (fill = items / (batches * max_batch))
    last_size: int = 0
    last_wait_s: float = 0.0
    # Batch sizes seen, by size: shows whether traffic fills batches or trickles.
    size_counts: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, size: int, max_batch: int, wait_s: float) -> None:
        with self._lock:
            self.batches += 1
            self.items += size
            self.full_batches += int(size >= max_batch)
            self.timed_out_batches += int(size < max_batch)
            self.wait_s_total += wait_s
            self.max_batch = max_batch
            self.last_size = size
            self.last_wait_s = wait_s
            self.size_counts[size] = self.size_counts.get(size, 0) + 1

    @property
    def mean_fill(self) -> float:
        """Average batch size as a fraction of max_batch (1.0: every batch full)."""
        if not self.batches or not self.max_batch:
            return 0.0
        return self.items / (self.batches * self.max_batch)

    @property
    def mean_wait_s(self) -> float:
        return self.wait_s_total / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "batches": self.batches,
                "items": self.items,
                "full_batches": self.full_batches,
                "timed_out_batches": self.timed_out_batches,
                "mean_fill": round(self.mean_fill, 4),
                "mean_wait_s": round(self.mean_wait_s, 6),
                "last_size": self.last_size,
                "last_wait_s": round(self.last_wait_s, 6),
            }


# What next_batch records into when the caller passes no stats of its own: the worker
# process runs one batcher, and metrics can read this without a handle on the pipeline.
BATCH_STATS = BatchStats()


async def next_batch(
    queue: asyncio.Queue[T],
    max_batch: int,
    max_wait_s: float,
    *,
    stats: BatchStats | None = None,
    on_first: Callable[[], None] | None = None,
    on_closed: Callable[[int, float], None] | None = None,
) -> list[T]:
    """Block for the first item, then gather more until the batch is full or time is up.

    Waiting only after the first item keeps an idle worker from spinning and a trickle of
    CMS jobs from waiting longer than ``max_wait_s`` behind an empty batch. ``on_first``
    runs when the first item arrives (the batch's work has begun), ``on_closed(size,
    wait_s)`` when the batch closes (metrics: size, fill, time from first item to close).
    """
    batch = [await queue.get()]
    started_s = time.monotonic()
    if on_first is not None:
        on_first()
    deadline = started_s + max_wait_s
    while len(batch) < max_batch:
        # Take whatever is already queued without yielding to the loop once per item.
        while len(batch) < max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        remaining_s = deadline - time.monotonic()
        if len(batch) >= max_batch or remaining_s <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining_s))
        except TimeoutError:
            break
    wait_s = time.monotonic() - started_s
    (stats or BATCH_STATS).record(len(batch), max_batch, wait_s)
    if on_closed is not None:
        on_closed(len(batch), wait_s)
    return batch


@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    padded: int  # rows the engine runs: stop - start real ones, the rest padding

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_chunks(n: int, preferred_sizes: Sequence[int], max_chunk: int) -> list[Chunk]:
    """Cut ``n`` rows into engine-sized chunks.

    With preferred sizes (an engine's profiles, CUDA graphs, compiled shapes) every chunk
    runs at one of them: full chunks of the largest, and the remainder padded up to the
    smallest size that holds it. Without, chunks are at most ``max_chunk`` rows, unpadded.
    """
    if n < 0 or max_chunk < 1:
        raise ValueError("n must be >= 0 and max_chunk >= 1")
    sizes = sorted({s for s in preferred_sizes if s >= 1})
    largest = sizes[-1] if sizes else max_chunk
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        rows = min(n - start, largest)
        padded = next((s for s in sizes if s >= rows), rows) if sizes else rows
        chunks.append(Chunk(start, start + rows, padded))
        start += rows
    return chunks


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
    """``batch`` with zero rows appended up to ``rows`` (the caller slices them off again)."""
    missing = rows - batch.shape[0]
    if missing <= 0:
        return batch
    padding = np.zeros((missing, *batch.shape[1:]), dtype=batch.dtype)
    return np.concatenate([batch, padding])


@dataclass
class IsolatedResult:
    """Vectors for the samples that embedded, errors for those that did not."""

    vectors: dict[int, np.ndarray]
    errors: dict[int, BaseException]


def embed_isolating(
    embed: Callable[[np.ndarray], np.ndarray],
    samples: Sequence[np.ndarray | None],
    *,
    shape: tuple[int, ...],
) -> IsolatedResult:
    """Embed what can be embedded; pin each failure on the sample that caused it.

    A sample of the wrong shape or dtype (or None) fails alone before stacking. If the
    model raises on a stack, the stack is halved and each half tried again, so a sample
    that breaks the model costs about log2(batch) extra calls and fails alone, while its
    neighbours still get their vectors.
    """
    errors: dict[int, BaseException] = {}
    good: list[int] = []
    for index, sample in enumerate(samples):
        if sample is None or sample.dtype != np.uint8 or sample.shape != shape:
            got = "nothing" if sample is None else f"{sample.dtype} {sample.shape}"
            errors[index] = ValueError(f"expected uint8 {shape}, got {got}")
        else:
            good.append(index)
    vectors: dict[int, np.ndarray] = {}

    def attempt(indices: list[int]) -> None:
        if not indices:
            return
        try:
            out = embed(np.stack([samples[i] for i in indices]))  # type: ignore[misc]
        except Exception as exc:
            if len(indices) == 1:
                errors[indices[0]] = exc
                return
            middle = len(indices) // 2
            attempt(indices[:middle])
            attempt(indices[middle:])
            return
        for row, index in enumerate(indices):
            vectors[index] = out[row]

    attempt(good)
    return IsolatedResult(vectors=vectors, errors=errors)
