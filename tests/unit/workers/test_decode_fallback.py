"""Fallback decoding: when a format's own decoder refuses the bytes, the other decoders
(libvips, Pillow, OpenCV) are tried, every guard still in force.

The damaged files are made here from clean images: a bad CRC on an ancillary PNG chunk
(Pillow refuses the file at its header; libvips and OpenCV read it), an unknown critical
PNG chunk (libvips and OpenCV refuse it; Pillow reads it), a bogus marker in a JPEG's
entropy data (Pillow fails; OpenCV decodes what comes before it and fills the rest grey).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common.errors import PermanentError, Reason
from workers.decode.cpu import decode_image
from workers.decode.preprocess import reference_preprocess

# Mean absolute difference to the Pillow reference allowed for libvips / OpenCV pixels
# (tests/unit/workers/test_decode_paths.py states the same for their fast paths).
OTHER_DECODER_MAD = 1.0


def _photo(width: int = 320, height: int = 240) -> Image.Image:
    blocks = np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.Resampling.BICUBIC)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes, *, bad_crc: bool = False) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", crc ^ (0xDEAD if bad_crc else 0))
    )


def _before_idat(png: bytes, chunk: bytes) -> bytes:
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def _with_size(png: bytes, width: int, height: int) -> bytes:
    """The IHDR rewritten to claim another size (with a valid CRC)."""
    ihdr = png[16:29]
    patched = struct.pack(">II", width, height) + ihdr[8:]
    return png[:8] + _chunk(b"IHDR", patched) + png[33:]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_a_png_pillow_refuses_is_read_by_another_decoder() -> None:
    clean = _png(_photo())
    damaged = _before_idat(clean, _chunk(b"tEXt", b"Comment\x00hello", bad_crc=True))
    with pytest.raises(Exception):  # noqa: B017 - the premise: Pillow alone cannot read it
        Image.open(io.BytesIO(damaged)).load()
    result = decode_image(damaged)
    assert result.fallback and result.path in ("vips-fallback", "opencv-fallback")
    assert not result.recovered and (result.width, result.height) == (320, 240)
    assert (
        _mad(result.pixels, reference_preprocess(Image.open(io.BytesIO(clean))))
        <= OTHER_DECODER_MAD
    )


def test_a_png_libvips_refuses_falls_back_to_pillow() -> None:
    clean = _png(_photo())
    damaged = _before_idat(clean, _chunk(b"XXXX", b"data"))  # unknown critical chunk
    result = decode_image(damaged)
    assert result.path == "pillow-fallback"
    np.testing.assert_array_equal(
        result.pixels, reference_preprocess(Image.open(io.BytesIO(clean)))
    )


def test_a_jpeg_read_only_in_part_is_measured_and_held_to_the_minimum() -> None:
    buffer = io.BytesIO()
    _photo().save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sos = data.index(b"\xff\xda")
    data[sos + 300 : sos + 302] = b"\xff\xc4"  # a DHT marker inside the entropy data
    damaged = bytes(data)
    result = decode_image(damaged, min_decoded_fraction=0.0)
    assert result.path == "opencv-fallback" and result.recovered
    assert 0.0 < result.decoded_fraction < 0.5  # mostly libjpeg's grey fill
    with pytest.raises(PermanentError) as refused:
        decode_image(damaged, min_decoded_fraction=0.5)
    assert refused.value.reason is Reason.TRUNCATED


def test_the_pixel_cap_holds_on_the_fallback_path() -> None:
    """Pillow cannot read the header; libvips's header says 20000 x 20000: refused before any
    fallback decoder allocates."""
    huge = _with_size(_png(_photo(32, 32)), 20_000, 20_000)
    damaged = _before_idat(huge, _chunk(b"tEXt", b"Comment\x00x", bad_crc=True))
    with pytest.raises(PermanentError) as refused:
        decode_image(damaged, max_pixels=50_000_000)
    assert refused.value.reason is Reason.TOO_MANY_PIXELS


def test_no_fallback_in_the_pillow_only_reference_mode() -> None:
    damaged = _before_idat(_png(_photo()), _chunk(b"tEXt", b"Comment\x00x", bad_crc=True))
    with pytest.raises(PermanentError) as refused:
        decode_image(damaged, fast_paths=False)
    assert refused.value.reason is Reason.UNDECODABLE


def test_bytes_no_decoder_reads_stay_undecodable() -> None:
    clean = _png(_photo())
    garbage = (
        clean[:40] + bytes(np.random.default_rng(1).integers(0, 256, 2000, np.uint8)) + clean[-12:]
    )
    with pytest.raises(PermanentError) as refused:
        decode_image(garbage)
    assert refused.value.reason in (Reason.UNDECODABLE, Reason.TRUNCATED)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    _photo().save(buffer, fmt)
    return buffer.getvalue()


def test_a_gif_pillow_calls_truncated_is_read_whole_by_libvips() -> None:
    data = bytearray(_encoded("GIF"))
    cut = len(data) * 8 // 10
    data[cut:-1] = bytes(len(data) - cut - 1)  # the tail of the pixel data zeroed
    with pytest.raises(OSError, match="truncated"):  # the premise: Pillow gives up
        Image.open(io.BytesIO(bytes(data))).load()
    result = decode_image(bytes(data))
    assert result.path == "vips-fallback" and not result.recovered


def test_a_bmp_with_a_damaged_info_header_is_read_by_opencv_alone() -> None:
    clean = _encoded("BMP")
    data = bytearray(clean)
    data[14] ^= 0x02  # the info header's size field: Pillow cannot parse the header
    result = decode_image(bytes(data))
    assert result.format == "bmp" and result.path == "opencv-fallback"
    assert (result.width, result.height) == (320, 240)
    reference = reference_preprocess(Image.open(io.BytesIO(clean)))
    assert _mad(result.pixels, reference) <= OTHER_DECODER_MAD
    # OpenCV goes first only when its own pixel cap is at least as tight as the call's.
    with pytest.raises(PermanentError):
        decode_image(bytes(data), max_pixels=10_000)
