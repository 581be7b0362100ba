"""Decode paths against the reference preprocessing, and failure classification."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, Reason
from workers.decode.cpu import decode_image, sniff_format
from workers.decode.preprocess import INPUT_SIZE, reference_preprocess, resize_and_crop
from workers.decode.types import DecodeResult

# Draft JPEG decodes at 1/2..1/8 DCT scale before the bilinear resize, so it is close to
# but not identical with a full-size decode (measured ~0.4 mean, max 3 on these images).
# Every other path is the reference pipeline itself.
DRAFT_MAX_MEAN_ABS_DIFF = 2.0
EXACT_MAX_MEAN_ABS_DIFF = 0.5


def photo_like(width_px: int, height_px: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise: compresses and resamples like a product photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height_px, 0:width_px].astype(np.float64)
    base = np.stack(
        [
            255 * x / width_px,
            255 * y / height_px,
            127 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def check_against_reference(data: bytes, max_diff: float) -> DecodeResult:
    result = decode_image(data)
    assert result.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert result.pixels.dtype == np.uint8
    assert result.pixels.flags["C_CONTIGUOUS"]
    assert not result.recovered
    reference = reference_preprocess(Image.open(io.BytesIO(data)))
    assert mean_abs_diff(result.pixels, reference) <= max_diff, result.path
    return result


RGB = photo_like(1000, 700)


def test_baseline_jpeg_uses_draft() -> None:
    data = encode(Image.fromarray(RGB), "JPEG", quality=90)
    result = check_against_reference(data, DRAFT_MAX_MEAN_ABS_DIFF)
    assert (result.format, result.width, result.height) == ("jpeg", 1000, 700)
    assert result.path == "pillow-draft"


def test_progressive_jpeg() -> None:
    data = encode(Image.fromarray(RGB), "JPEG", quality=85, progressive=True)
    result = check_against_reference(data, DRAFT_MAX_MEAN_ABS_DIFF)
    assert result.path == "pillow-draft"


def test_small_jpeg_needs_no_draft() -> None:
    data = encode(Image.fromarray(photo_like(300, 260)), "JPEG")
    result = check_against_reference(data, EXACT_MAX_MEAN_ABS_DIFF)
    assert result.path == "pillow"


def test_greyscale_jpeg() -> None:
    data = encode(Image.fromarray(RGB).convert("L"), "JPEG")
    result = check_against_reference(data, DRAFT_MAX_MEAN_ABS_DIFF)
    channels = result.pixels.astype(np.int16)
    assert np.array_equal(channels[..., 0], channels[..., 1])


def test_cmyk_jpeg() -> None:
    data = encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    check_against_reference(data, DRAFT_MAX_MEAN_ABS_DIFF)


def test_exif_rotated_jpeg() -> None:
    # What a viewer should show: top half red, bottom half blue (portrait).
    shown = np.zeros((400, 300, 3), np.uint8)
    shown[:200] = (255, 0, 0)
    shown[200:] = (0, 0, 255)
    # Orientation 6 means "rotate 90 degrees clockwise to display", so store it rotated
    # counter-clockwise.
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    result = check_against_reference(data, EXACT_MAX_MEAN_ABS_DIFF)
    assert (result.width, result.height) == (400, 300)  # as stored
    top, bottom = result.pixels[20, 112], result.pixels[-20, 112]
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_png_rgba_composited_on_white() -> None:
    rgba = np.zeros((500, 600, 4), np.uint8)
    rgba[..., :3] = RGB[:500, :600]
    rgba[:, :300, 3] = 255  # left half opaque, right half fully transparent
    data = encode(Image.fromarray(rgba), "PNG")
    result = check_against_reference(data, EXACT_MAX_MEAN_ABS_DIFF)
    assert result.format == "png"
    assert (result.pixels[:, -40:] == 255).all()


def test_png_16bit_greyscale_scaled_not_clipped() -> None:
    grey16 = (photo_like(640, 480)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    result = check_against_reference(data, EXACT_MAX_MEAN_ABS_DIFF)
    expected = resize_and_crop(np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))
    assert mean_abs_diff(result.pixels, expected) <= EXACT_MAX_MEAN_ABS_DIFF


def test_png_16bit_rgb() -> None:
    rgb16 = RGB[:480, :640].astype(np.uint16) * 257
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))
    assert ok
    result = check_against_reference(encoded.tobytes(), EXACT_MAX_MEAN_ABS_DIFF)
    expected = resize_and_crop(np.ascontiguousarray(RGB[:480, :640]))
    assert mean_abs_diff(result.pixels, expected) <= EXACT_MAX_MEAN_ABS_DIFF


def test_palette_png_with_transparency() -> None:
    palette_img = Image.fromarray(RGB[:400, :500]).quantize(64)
    data = encode(palette_img, "PNG", transparency=0)
    check_against_reference(data, EXACT_MAX_MEAN_ABS_DIFF)


def test_webp_lossy_and_alpha() -> None:
    check_against_reference(encode(Image.fromarray(RGB), "WEBP", quality=80), 0.5)
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 128, np.uint8)])
    result = check_against_reference(encode(Image.fromarray(rgba), "WEBP", lossless=True), 0.5)
    assert result.format == "webp"


def test_animated_gif_takes_first_frame() -> None:
    frames = [Image.new("RGB", (320, 240), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    result = check_against_reference(data, EXACT_MAX_MEAN_ABS_DIFF)
    assert result.format == "gif"
    assert (result.pixels == (255, 0, 0)).all()


def test_bmp_and_tiff() -> None:
    small = Image.fromarray(RGB[:300, :400])
    assert check_against_reference(encode(small, "BMP"), 0.5).format == "bmp"
    assert check_against_reference(encode(small, "TIFF"), 0.5).format == "tiff"


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_recovered(progressive: bool) -> None:
    data = encode(Image.fromarray(RGB), "JPEG", quality=90, progressive=progressive)
    cut = data[: len(data) * 6 // 10]
    result = decode_image(cut)
    assert result.recovered
    assert result.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    # The top of the image came through intact.
    full = decode_image(data).pixels
    assert mean_abs_diff(result.pixels[:40], full[:40]) <= 3.0
    with pytest.raises(PermanentError) as err:
        decode_image(cut, recover_truncated=False)
    assert err.value.reason == Reason.TRUNCATED


def test_jpeg_missing_only_eoi_is_recovered() -> None:
    data = encode(Image.fromarray(RGB), "JPEG")
    assert data.endswith(b"\xff\xd9")
    result = decode_image(data[:-2])
    assert result.recovered
    assert mean_abs_diff(result.pixels, decode_image(data).pixels) <= 0.5


def test_jpeg_cut_inside_marker_segment_uses_truncated_mode() -> None:
    data = encode(Image.fromarray(RGB), "JPEG", progressive=True)
    first_scan = data.index(b"\xff\xda")
    later_table = data.index(b"\xff\xc4", first_scan)  # Huffman table between scans
    result = decode_image(data[: later_table + 3])
    assert result.recovered
    assert result.path.endswith("+truncated")
    # The process-wide Pillow flag is restored.
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_truncated_png_and_webp_are_permanent(fmt: str) -> None:
    data = encode(Image.fromarray(RGB), fmt)
    with pytest.raises(PermanentError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == Reason.TRUNCATED


def test_empty() -> None:
    with pytest.raises(PermanentError) as err:
        decode_image(b"")
    assert err.value.reason == Reason.EMPTY


def test_html_is_not_an_image() -> None:
    with pytest.raises(PermanentError) as err:
        decode_image(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    assert err.value.reason == Reason.NOT_AN_IMAGE


def png_header_only(width_px: int, height_px: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width_px, height_px, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side_px", [30_000, 8_000])
def test_too_many_pixels_from_header(side_px: int) -> None:
    # 30000^2 also trips Pillow's own bomb check; 8000^2 only ours (default 50 MP).
    started = time.perf_counter()
    with pytest.raises(PermanentError) as err:
        decode_image(png_header_only(side_px, side_px))
    assert err.value.reason == Reason.TOO_MANY_PIXELS
    assert time.perf_counter() - started < 0.5  # 2.7 GB of RGB was never allocated


def test_an_image_over_pillows_warning_limit_is_rejected_without_a_warning() -> None:
    # 10000^2 is over Pillow's warning limit (89 MP) and under its error limit: the user
    # saw a DecompressionBombWarning line before our clean too_many_pixels reason. A fresh
    # process, as the user's: pytest resets warning filters set while it imports modules.
    script = (
        "import sys\n"
        "from tests.unit.workers.test_decode import png_header_only\n"
        "from workers.decode.cpu import decode_image\n"
        "try:\n"
        "    decode_image(png_header_only(10_000, 10_000))\n"
        "except Exception as exc:\n"
        "    print(exc.reason.value)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.stdout.strip() == Reason.TOO_MANY_PIXELS.value, done.stdout + done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_max_pixels_is_configurable() -> None:
    data = encode(Image.fromarray(RGB), "JPEG")
    with pytest.raises(PermanentError) as err:
        decode_image(data, max_pixels=500_000)
    assert err.value.reason == Reason.TOO_MANY_PIXELS


@pytest.mark.parametrize("seed", range(8))
def test_garbage_after_jpeg_magic(seed: int) -> None:
    garbage = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(PermanentError) as err:
        decode_image(b"\xff\xd8\xff" + garbage)
    assert err.value.reason in (Reason.UNDECODABLE, Reason.TRUNCATED)


def test_corrupt_header_after_valid_start() -> None:
    data = bytearray(encode(Image.fromarray(RGB), "PNG"))
    data[16:24] = b"\x00" * 8  # zero width and height in IHDR
    with pytest.raises(PermanentError) as err:
        decode_image(bytes(data))
    assert err.value.reason in (Reason.UNDECODABLE, Reason.TRUNCATED)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF89a", "gif"),
        (b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00", "bmp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"BMW is a car", None),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (b"%PDF-1.7", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head + b"\x00" * 16) == expected
    assert sniff_format(head[:2]) is None  # too short to tell
