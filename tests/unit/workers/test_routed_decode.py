"""The GPU/CPU decode front, with a stand-in GPU decoder (the real one needs CUDA)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
from PIL import Image

from workers.decode.cpu import decode_image
from workers.decode.routing import DecodeRouter, RoutedDecoder
from workers.decode.types import DecodeResult


def _encode(fmt: str, size: tuple[int, int] = (320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


class _Cpu:
    def __init__(self) -> None:
        self.calls = 0

    async def decode(self, data: bytes) -> DecodeResult:
        self.calls += 1
        return decode_image(data, max_pixels=10_000_000)


class _Gpu:
    """Decodes like the CPU path but answers for a whole batch, and rejects marked bytes."""

    def __init__(self, reject: bytes = b"") -> None:
        self.batches: list[int] = []
        self.reject = reject

    def decode_batch(self, images: list[bytes]) -> list[np.ndarray | Exception]:
        self.batches.append(len(images))
        return [
            RuntimeError("nvjpeg: unsupported")
            if data == self.reject
            else decode_image(data, max_pixels=10_000_000).pixels
            for data in images
        ]


def _decoder(cpu: _Cpu, gpu: _Gpu, **kw: int) -> RoutedDecoder:
    # A GPU prior far above the CPU's: every eligible JPEG prefers the GPU.
    router = DecodeRouter(gpu_available=True, cpu_rate_per_s=1.0, gpu_rate_per_s=1e6)
    return RoutedDecoder(cpu, gpu, router, max_pixels=kw.get("max_pixels", 10_000_000))


def test_concurrent_jpegs_are_decoded_on_the_gpu_in_one_batch() -> None:
    cpu, gpu = _Cpu(), _Gpu()
    decoder = _decoder(cpu, gpu)
    jpegs = [_encode("JPEG", (320 + i, 240)) for i in range(6)]

    async def main() -> list[DecodeResult]:
        return await asyncio.gather(*(decoder.decode(data) for data in jpegs))

    results = asyncio.run(main())
    assert gpu.batches == [6] and cpu.calls == 0
    assert [r.path for r in results] == ["nvjpeg"] * 6
    assert all(r.on_gpu for r in results)
    assert [(r.width, r.height) for r in results] == [(320 + i, 240) for i in range(6)]
    assert all(r.pixels.shape == (224, 224, 3) for r in results)


def test_png_webp_and_rejected_jpegs_go_to_the_cpu() -> None:
    rejected = _encode("JPEG", (300, 200))
    cpu, gpu = _Cpu(), _Gpu(reject=rejected)
    decoder = _decoder(cpu, gpu)

    async def main() -> list[DecodeResult]:
        return [
            await decoder.decode(_encode("PNG")),
            await decoder.decode(_encode("WEBP")),
            await decoder.decode(rejected),
        ]

    png, webp, fallback = asyncio.run(main())
    assert png.format == "png" and webp.format == "webp"
    assert fallback.path != "nvjpeg" and fallback.pixels.shape == (224, 224, 3)
    assert not fallback.on_gpu
    assert cpu.calls == 3 and gpu.batches == [1]
    assert decoder.gpu_fallbacks == 1


def test_a_jpeg_over_the_pixel_cap_never_reaches_the_gpu() -> None:
    cpu, gpu = _Cpu(), _Gpu()
    decoder = _decoder(cpu, gpu, max_pixels=1000)
    result = asyncio.run(decoder.decode(_encode("JPEG", (20, 20))))  # 400 px: allowed
    assert result.path == "nvjpeg" and result.on_gpu
    # 76,800 px: over the cap, so the CPU path (which refuses it in a real worker) gets it.
    over = asyncio.run(decoder.decode(_encode("JPEG", (320, 240))))
    assert over.path != "nvjpeg" and not over.on_gpu
    assert gpu.batches == [1] and cpu.calls == 1
