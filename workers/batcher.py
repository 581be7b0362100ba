"""Dynamic batching: up to ``max_batch`` items or ``max_wait_s``, whichever comes first."""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

T = TypeVar("T")


async def next_batch(queue: asyncio.Queue[T], max_batch: int, max_wait_s: float) -> list[T]:
    """Block for the first item, then gather more until the batch is full or time is up.

    Waiting only after the first item keeps an idle worker from spinning and a trickle of
    CMS jobs from waiting longer than ``max_wait_s`` behind an empty batch.
    """
    batch = [await queue.get()]
    deadline = time.monotonic() + max_wait_s
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
    return batch
