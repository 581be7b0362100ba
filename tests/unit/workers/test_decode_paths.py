"""Every decode path against the one reference preprocessing, within stated tolerances.

Tolerances (mean absolute difference per channel value, 0-255 scale):
- ``pillow`` (GIF, BMP, TIFF, animated or EXIF WebP, PNG with eXIf): the reference itself,
  <= 0.5;
- ``vips`` (PNG) and ``opencv`` (WebP): a different decoder but the same full-size pixels
  and the same resize, <= 1.0 (alpha compositing rounding, libwebp versions);
- ``pillow-draft`` (JPEG at 1/2..1/8 DCT scale, then the resize): <= 2.0.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, Reason
from tests.unit.workers.test_decode import encode, mean_abs_diff, photo_like
from workers.decode.cpu import decode_image
from workers.decode.preprocess import reference_preprocess

TOLERANCE = {"pillow": 0.5, "vips": 1.0, "opencv": 1.0, "pillow-draft": 2.0}
RGB = photo_like(1200, 900, seed=3)


def reference(data: bytes) -> np.ndarray:
    return reference_preprocess(Image.open(io.BytesIO(data)))


def rgba_image() -> Image.Image:
    alpha = np.full(RGB.shape[:2], 255, np.uint8)
    alpha[:, 600:] = np.linspace(0, 255, 600, dtype=np.uint8)[None, :]
    return Image.fromarray(np.dstack([RGB, alpha]))


CASES = {
    "jpeg-baseline": (lambda: encode(Image.fromarray(RGB), "JPEG", quality=90), "pillow-draft"),
    "jpeg-progressive": (
        lambda: encode(Image.fromarray(RGB), "JPEG", quality=85, progressive=True),
        "pillow-draft",
    ),
    "jpeg-cmyk": (lambda: encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "pillow-draft"),
    "jpeg-grey": (lambda: encode(Image.fromarray(RGB).convert("L"), "JPEG"), "pillow-draft"),
    "png-rgb": (lambda: encode(Image.fromarray(RGB), "PNG"), "vips"),
    "png-rgba": (lambda: encode(rgba_image(), "PNG"), "vips"),
    "png-grey": (lambda: encode(Image.fromarray(RGB).convert("L"), "PNG"), "vips"),
    "png-grey-alpha": (lambda: encode(rgba_image().convert("LA"), "PNG"), "vips"),
    "png-palette-trns": (
        lambda: encode(Image.fromarray(RGB).quantize(64), "PNG", transparency=3),
        "vips",
    ),
    "png-16bit-grey": (
        lambda: encode(Image.fromarray(RGB[..., 1].astype(np.uint16) * 257), "PNG"),
        "vips",
    ),
    "png-16bit-rgba": (
        lambda: cv2.imencode(
            ".png",
            np.dstack(
                [RGB[..., ::-1].astype(np.uint16) * 257, np.full(RGB.shape[:2], 40000)]
            ).astype(np.uint16),
        )[1].tobytes(),
        "vips",
    ),
    "webp-lossy": (lambda: encode(Image.fromarray(RGB), "WEBP", quality=85), "opencv"),
    "webp-alpha": (lambda: encode(rgba_image(), "WEBP", lossless=True), "opencv"),
    "gif": (lambda: encode(Image.fromarray(RGB).quantize(128), "GIF"), "pillow"),
    "bmp": (lambda: encode(Image.fromarray(RGB), "BMP"), "pillow"),
    "tiff": (lambda: encode(Image.fromarray(RGB), "TIFF"), "pillow"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_path_matches_reference(case: str) -> None:
    make, expected_path = CASES[case]
    data = make()
    result = decode_image(data)
    assert result.path == expected_path, result.path
    assert result.pixels.shape == (224, 224, 3) and result.pixels.flags["C_CONTIGUOUS"]
    diff = mean_abs_diff(result.pixels, reference(data))
    assert diff <= TOLERANCE[expected_path], f"{case}: {diff:.3f}"
    # The all-Pillow route agrees too (what fast_paths=False gives).
    slow = decode_image(data, fast_paths=False)
    assert mean_abs_diff(result.pixels, slow.pixels) <= TOLERANCE[expected_path]


def test_png_16bit_alpha_is_composited_after_the_high_byte() -> None:
    # Opaque-ish 16-bit alpha: compositing must use the 8-bit value, as the reference does.
    data = CASES["png-16bit-rgba"][0]()
    result = decode_image(data)
    assert mean_abs_diff(result.pixels, reference(data)) <= 1.0
    assert result.pixels.mean() > RGB.mean()  # partly transparent over white is lighter


def test_animated_webp_goes_to_pillow_first_frame() -> None:
    frames = [Image.new("RGB", (300, 260), colour) for colour in ("red", "blue")]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    result = decode_image(data)
    assert result.path == "pillow"
    assert (np.abs(result.pixels.astype(int) - (255, 0, 0)) <= 2).all()


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("WEBP", {"quality": 95}), ("PNG", {})],
    ids=["webp-exif-orientation", "png-exif-chunk"],
)
def test_an_exif_rotated_webp_or_png_goes_to_pillow_and_is_rotated(
    fmt: str, options: dict[str, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = np.zeros((400, 300, 3), np.uint8)
    shown[:200] = (255, 0, 0)
    shown[200:] = (0, 0, 255)
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    data = encode(stored, fmt, exif=exif.tobytes(), **options)
    result = decode_image(data)
    assert result.path == "pillow"
    assert result.pixels[10, 112][0] > 200 and result.pixels[-10, 112][2] > 200


def test_truncated_baseline_reports_decoded_fraction_and_policy() -> None:
    data = encode(Image.fromarray(RGB), "JPEG", quality=90)
    cut = data[: len(data) * 3 // 10]
    result = decode_image(cut)
    assert result.recovered
    assert 0.1 < result.decoded_fraction < 0.6, result.decoded_fraction
    with pytest.raises(PermanentError) as err:
        decode_image(cut, min_decoded_fraction=0.8)
    assert err.value.reason == Reason.TRUNCATED and "of the rows" in err.value.message
    whole = decode_image(data)
    assert whole.decoded_fraction == 1.0 and not whole.recovered


def test_truncated_png_through_vips_is_truncated_not_partial() -> None:
    data = CASES["png-rgb"][0]()
    with pytest.raises(PermanentError) as err:
        decode_image(data[: len(data) * 2 // 3])
    assert err.value.reason == Reason.TRUNCATED


def test_truncated_webp_through_opencv_is_truncated() -> None:
    data = CASES["webp-lossy"][0]()
    with pytest.raises(PermanentError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == Reason.TRUNCATED
