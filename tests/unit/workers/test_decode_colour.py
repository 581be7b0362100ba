"""Colour-true decoding: an embedded ICC profile is converted to sRGB on every CPU path.

Profiles are written by ``tests.support.icc`` (Adobe RGB 1998, Display P3 primaries). The
expected pixels are littlecms's own conversion of the undamaged source, through Pillow's
``ImageCms`` directly; the decoder must land there, and away from the naive reading that
takes the stored numbers as sRGB.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.support.icc import ADOBE_RGB_1998, DISPLAY_P3, rgb_profile
from workers.decode.cpu import decode_image
from workers.decode.nvjpeg import gpu_eligible
from workers.decode.preprocess import Preprocess, resize_and_crop, to_srgb

SPEC = Preprocess(64, "squash")
PROFILES = {"adobe-rgb": ADOBE_RGB_1998, "display-p3": DISPLAY_P3}


def _source(mode: str = "RGB") -> Image.Image:
    # Saturated, mid-tone patches: where wide-gamut and sRGB readings differ most.
    colours = [(200, 120, 60), (40, 180, 90), (70, 90, 210), (230, 40, 150)]
    img = Image.new("RGB", (256, 192))
    for i, colour in enumerate(colours):
        img.paste(colour, (i * 64, 0, i * 64 + 64, 192))
    if mode == "RGBA":
        img = img.convert("RGBA")
    return img


def _encode(img: Image.Image, fmt: str, icc: bytes) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "WEBP":
        options["lossless"] = True
    img.save(buffer, fmt, icc_profile=icc, **options)
    return buffer.getvalue()


def _expected(img: Image.Image, icc: bytes) -> np.ndarray:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    srgb = ImageCms.createProfile("sRGB")
    converted = ImageCms.profileToProfile(
        img.convert("RGB"),
        profile,
        srgb,
        outputMode="RGB",
        renderingIntent=ImageCms.Intent.PERCEPTUAL,
    )
    assert converted is not None
    return resize_and_crop(np.asarray(converted), SPEC)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("space", sorted(PROFILES))
def test_a_wide_gamut_profile_is_converted_to_srgb(fmt: str, space: str) -> None:
    icc = rgb_profile(space, PROFILES[space])
    source = _source()
    data = _encode(source, fmt, icc)
    got = decode_image(data, preprocess=SPEC).pixels
    expected = _expected(source, icc)
    naive = resize_and_crop(np.asarray(source), SPEC)
    tolerance = 2.5 if fmt == "JPEG" else 0.5  # JPEG: its own compression error
    assert _mad(got, expected) <= tolerance
    assert _mad(naive, expected) > 3 * tolerance  # the conversion matters here


def test_alpha_survives_the_conversion_and_is_composited_on_white() -> None:
    icc = rgb_profile("display-p3", DISPLAY_P3)
    source = _source("RGBA")
    alpha = Image.new("L", source.size, 255)
    alpha.paste(0, (0, 0, 64, 192))  # the first patch fully transparent
    source.putalpha(alpha)
    got = decode_image(_encode(source, "PNG", icc), preprocess=SPEC).pixels
    assert (got[:, :10] == 255).all()  # transparent: white, untouched by the profile
    assert _mad(got[:, 20:], _expected(source, icc)[:, 20:]) <= 0.5


def test_an_srgb_profile_and_an_unreadable_one_leave_pixels_as_they_are() -> None:
    source = _source()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    naive = resize_and_crop(np.asarray(source), SPEC)
    for icc in (srgb, b"not an icc profile at all" * 8):
        got = decode_image(_encode(source, "PNG", icc), preprocess=SPEC).pixels
        assert _mad(got, naive) <= 0.5


def test_to_srgb_is_a_no_op_without_a_profile() -> None:
    img = _source()
    assert to_srgb(img) is img


def test_jpegs_with_a_profile_stay_off_the_gpu_path() -> None:
    source = _source()
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", quality=90)
    assert gpu_eligible(buffer.getvalue())
    assert not gpu_eligible(_encode(source, "JPEG", rgb_profile("p3", DISPLAY_P3)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_the_result_names_the_profile_it_converted_from(fmt: str) -> None:
    source = _source()
    converted = decode_image(_encode(source, fmt, rgb_profile("Display P3", DISPLAY_P3)))
    assert converted.colour_from == "Display P3"
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert decode_image(_encode(source, fmt, srgb)).colour_from == ""
    assert decode_image(_encode(source, fmt, b"")).colour_from == ""
