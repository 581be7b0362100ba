"""The decode stage's front: eligible JPEGs to the GPU in small batches, the rest to the pool.

``DecodeRouter`` picks the side per image: an eligible JPEG (``nvjpeg.gpu_eligible``) goes
to whichever side promises the shorter wait, in-flight jobs divided by that side's
measured rate (an exponentially weighted average), so a saturated GPU spills JPEGs to the
CPU and an idle one takes them all. Without a GPU everything goes to the CPU; the routing
logic is pure and unit-tested anywhere.

``RoutedDecoder`` is a ``Decoder`` like the CPU pool it fronts (``await decode(bytes)``).
GPU images are gathered for up to ``max_wait_s`` or ``max_batch`` images and decoded in
one nvJPEG call on a thread, and an image nvJPEG rejects is decoded again on the CPU, so
the GPU path can only add speed, never failures. Images over the pixel cap never reach
the GPU: the CPU path refuses them from the header with the proper reason.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Literal, Protocol

import numpy as np

from workers.decode.nvjpeg import gpu_eligible, jpeg_info
from workers.decode.types import Decoder, DecodeResult

Side = Literal["cpu", "gpu"]


@dataclass
class _SideLoad:
    in_flight: int = 0
    rate_per_s: float = 0.0  # EWMA of completed images per second of busy time


@dataclass
class DecodeRouter:
    """Chooses the decode side per image; thread-safe; feed it completions via ``done``."""

    gpu_available: bool
    cpu_rate_per_s: float = 100.0  # priors until measurements arrive
    gpu_rate_per_s: float = 1000.0
    smoothing: float = 0.2
    _loads: dict[str, _SideLoad] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._loads = {
            "cpu": _SideLoad(rate_per_s=self.cpu_rate_per_s),
            "gpu": _SideLoad(rate_per_s=self.gpu_rate_per_s),
        }

    def expected_wait_s(self, side: Side) -> float:
        load = self._loads[side]
        return (load.in_flight + 1) / max(load.rate_per_s, 1e-6)

    def route(self, data: bytes) -> Side:
        """Pick a side for ``data`` and count it in flight there."""
        with self._lock:
            side: Side = "cpu"
            if (
                self.gpu_available
                and gpu_eligible(data)
                and self.expected_wait_s("gpu") <= self.expected_wait_s("cpu")
            ):
                side = "gpu"
            self._loads[side].in_flight += 1
            return side

    def done(self, side: Side, images: int, busy_s: float) -> None:
        """Report ``images`` finished on ``side`` after ``busy_s`` seconds of work."""
        with self._lock:
            load = self._loads[side]
            load.in_flight = max(0, load.in_flight - images)
            if images > 0 and busy_s > 0:
                rate = images / busy_s
                load.rate_per_s += self.smoothing * (rate - load.rate_per_s)

    def in_flight(self, side: Side) -> int:
        return self._loads[side].in_flight


class GpuBatchDecoder(Protocol):
    def decode_batch(self, images: list[bytes]) -> list[np.ndarray | Exception]: ...


@dataclass(eq=False)
class RoutedDecoder:
    cpu: Decoder
    gpu: GpuBatchDecoder
    router: DecodeRouter
    _: KW_ONLY
    max_pixels: int
    max_batch: int = 32
    max_wait_s: float = 0.005
    gpu_fallbacks: int = field(default=0, init=False)  # rejected by nvJPEG, decoded on the CPU
    _pending: list[tuple[bytes, asyncio.Future[np.ndarray | Exception]]] = field(
        default_factory=list, init=False, repr=False
    )
    _timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    # held so they are not collected
    _batches: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    async def decode(self, data: bytes) -> DecodeResult:
        info = jpeg_info(data)
        too_big = info is None or info.width * info.height > self.max_pixels
        side = "cpu" if too_big else self.router.route(data)
        if side == "cpu":
            started = time.perf_counter()
            try:
                return await self.cpu.decode(data)
            finally:
                if not too_big:
                    self.router.done("cpu", 1, time.perf_counter() - started)
        assert info is not None
        started = time.perf_counter()
        pixels = await self._submit(data)
        if isinstance(pixels, Exception):
            self.gpu_fallbacks += 1
            return await self.cpu.decode(data)
        return DecodeResult(
            pixels=pixels,
            format="jpeg",
            width=info.width,
            height=info.height,
            recovered=False,
            decode_ms=(time.perf_counter() - started) * 1000,
            path="nvjpeg",
            on_gpu=True,
        )

    def _submit(self, data: bytes) -> asyncio.Future[np.ndarray | Exception]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray | Exception] = loop.create_future()
        self._pending.append((data, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush)
        return future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[tuple[bytes, asyncio.Future[np.ndarray | Exception]]]) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.gpu.decode_batch, [data for data, _ in batch])
        except Exception as exc:  # the device itself failed: every image goes to the CPU
            results = [exc] * len(batch)
        self.router.done("gpu", len(batch), time.perf_counter() - started)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
