"""Formats CDNs serve: AVIF (Pillow's own plugin), HEIC/HEIF (pillow-heif), animated GIF,
WebP and APNG (the first frame), TIFF and BMP; formats no decoder here reads get the
``unsupported_format`` reason instead of "not an image"."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, Reason
from workers.decode.cpu import decode_image, sniff_format
from workers.decode.preprocess import Preprocess, reference_preprocess

SPEC = Preprocess(64, "squash")


def _photo() -> Image.Image:
    blocks = np.random.default_rng(3).integers(0, 255, (6, 8, 3), np.uint8)
    return Image.fromarray(blocks).resize((320, 240), Image.Resampling.BICUBIC)


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize(
    ("fmt", "name", "options", "tolerance"),
    [
        ("AVIF", "avif", {"quality": 90}, 4.0),
        ("HEIF", "heif", {"quality": 90}, 4.0),
        ("TIFF", "tiff", {}, 0.0),
        ("BMP", "bmp", {}, 0.0),
    ],
)
def test_a_format_decodes_to_the_reference(
    fmt: str, name: str, options: dict[str, object], tolerance: float
) -> None:
    photo = _photo()
    data = _encode(photo, fmt, **options)
    assert sniff_format(data) == name
    result = decode_image(data, preprocess=SPEC)
    assert result.format == name and (result.width, result.height) == (320, 240)
    # Lossy formats against their own decode; the source itself is further off.
    assert _mad(result.pixels, reference_preprocess(Image.open(io.BytesIO(data)), SPEC)) <= 0.5
    assert _mad(result.pixels, reference_preprocess(photo, SPEC)) <= tolerance + 0.5


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "gif"), ("WEBP", "webp"), ("PNG", "png")])
def test_an_animation_gives_its_first_frame(fmt: str, name: str) -> None:
    first = Image.new("RGB", (120, 90), (220, 30, 30))
    second = Image.new("RGB", (120, 90), (30, 30, 220))
    options: dict[str, object] = {"save_all": True, "append_images": [second], "duration": 100}
    if fmt == "WEBP":
        options["lossless"] = True
    data = _encode(first, fmt, **options)
    result = decode_image(data, preprocess=SPEC)
    assert result.format == name
    red, _, blue = result.pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200 and blue < 60  # the first frame, not the second (or a blend)


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"\xff\x0a\xfa\x7f" + bytes(64), "jpeg-xl"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(64), "jpeg-xl"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64), "jpeg-2000"),
        (b"8BPS\x00\x01" + bytes(64), "psd"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "svg"),
        (b"<svg width='1' height='1'/>", "svg"),
    ],
)
def test_recognised_but_unsupported_formats_have_their_own_reason(data: bytes, name: str) -> None:
    with pytest.raises(PermanentError) as refused:
        decode_image(data)
    assert refused.value.reason is Reason.UNSUPPORTED_FORMAT
    assert name in str(refused.value)


def test_text_is_still_not_an_image() -> None:
    with pytest.raises(PermanentError) as refused:
        decode_image(b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    assert refused.value.reason is Reason.NOT_AN_IMAGE
