"""The CPU/GPU decode router (pure logic, runs anywhere) and the GPU path (CUDA only)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workers.decode.nvjpeg import gpu_available, gpu_eligible, jpeg_info
from workers.decode.preprocess import reference_preprocess
from workers.decode.routing import DecodeRouter


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8))
BASELINE = encode(RGB, "JPEG")
PROGRESSIVE = encode(RGB, "JPEG", progressive=True)
CMYK = encode(RGB.convert("CMYK"), "JPEG")
GREY = encode(RGB.convert("L"), "JPEG")
PNG = encode(RGB, "PNG")


def test_jpeg_info_reads_the_frame_header() -> None:
    assert jpeg_info(BASELINE) == jpeg_info(BASELINE[:2000])
    info = jpeg_info(BASELINE)
    assert info is not None and (info.kind, info.precision_bits, info.components) == (
        "baseline",
        8,
        3,
    )
    assert jpeg_info(PROGRESSIVE).kind == "progressive"  # type: ignore[union-attr]
    cmyk = jpeg_info(CMYK)
    assert cmyk is not None and cmyk.components == 4 and cmyk.adobe
    assert jpeg_info(PNG) is None
    assert jpeg_info(b"\xff\xd8\xff\xe0\x00") is None


def test_eligibility() -> None:
    assert gpu_eligible(BASELINE) and gpu_eligible(PROGRESSIVE) and gpu_eligible(GREY)
    assert not gpu_eligible(CMYK) and not gpu_eligible(PNG) and not gpu_eligible(b"")


def test_without_gpu_everything_goes_to_cpu() -> None:
    router = DecodeRouter(gpu_available=False)
    assert {router.route(d) for d in (BASELINE, PROGRESSIVE, PNG)} == {"cpu"}
    assert router.in_flight("cpu") == 3 and router.in_flight("gpu") == 0


def test_non_jpeg_and_cmyk_always_go_to_cpu() -> None:
    router = DecodeRouter(gpu_available=True)
    assert router.route(PNG) == "cpu"
    assert router.route(CMYK) == "cpu"
    assert router.route(BASELINE) == "gpu"


def test_split_follows_expected_wait() -> None:
    router = DecodeRouter(gpu_available=True, cpu_rate_per_s=100.0, gpu_rate_per_s=400.0)
    sides = [router.route(BASELINE) for _ in range(50)]
    # With 4x the rate the GPU should take about 4 of every 5 eligible images.
    assert 35 <= sides.count("gpu") <= 45, sides.count("gpu")
    # A slow GPU measurement shifts the split towards the CPU.
    router = DecodeRouter(gpu_available=True, cpu_rate_per_s=100.0, gpu_rate_per_s=400.0)
    for _ in range(30):
        router.route(BASELINE)
        router.done("gpu", 1, 1.0)  # 1 image/s measured
    sides = [router.route(BASELINE) for _ in range(20)]
    assert sides.count("cpu") >= 15


def test_done_never_goes_negative() -> None:
    router = DecodeRouter(gpu_available=True)
    router.done("cpu", 5, 0.1)
    assert router.in_flight("cpu") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CUDA and torchvision")
def test_gpu_decode_matches_reference() -> None:
    from workers.decode.nvjpeg import GpuJpegDecoder

    decoder = GpuJpegDecoder()
    out = decoder.decode_batch([BASELINE, PROGRESSIVE, b"\xff\xd8\xff garbage"])
    for data, pixels in zip((BASELINE, PROGRESSIVE), out[:2], strict=True):
        assert isinstance(pixels, np.ndarray)
        ref = reference_preprocess(Image.open(io.BytesIO(data)))
        assert np.abs(pixels.astype(int) - ref.astype(int)).mean() <= 2.0
    assert isinstance(out[2], Exception)
