"""The decode stage's front: eligible JPEGs to the GPU in small batches, the rest to the pool.

``RoutedDecoder`` looks like the CPU pool to the pipeline (``await decode(bytes)``). Each
image is routed by ``DecodeRouter`` (shorter expected wait wins); GPU images are gathered
for up to ``max_wait_s`` or ``max_batch`` images and decoded in one nvJPEG call on a
thread, and an image nvJPEG rejects is decoded again on the CPU, so the GPU path can only
add speed, never failures. Images over the pixel cap never reach the GPU: the CPU path
refuses them from the header with the proper reason.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import numpy as np

from workers.decode.cpu import DecodeResult
from workers.decode.nvjpeg import DecodeRouter, jpeg_info


class CpuDecoder(Protocol):
    async def decode(self, data: bytes) -> DecodeResult: ...


class GpuBatchDecoder(Protocol):
    def decode_batch(self, images: list[bytes]) -> list[np.ndarray | Exception]: ...


class RoutedDecoder:
    def __init__(
        self,
        cpu: CpuDecoder,
        gpu: GpuBatchDecoder,
        router: DecodeRouter,
        *,
        max_pixels: int,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
    ) -> None:
        self.cpu = cpu
        self.gpu = gpu
        self.router = router
        self.max_pixels = max_pixels
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.gpu_images = 0
        self.gpu_fallbacks = 0  # rejected by nvJPEG, decoded on the CPU instead
        self._pending: list[tuple[bytes, asyncio.Future[np.ndarray | Exception]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._batches: set[asyncio.Task[None]] = set()  # held so they are not collected

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
        self.gpu_images += 1
        return DecodeResult(
            pixels=pixels,
            format="jpeg",
            width=info.width,
            height=info.height,
            recovered=False,
            decode_ms=(time.perf_counter() - started) * 1000,
            path="nvjpeg",
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
