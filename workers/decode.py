"""CPU image decode: bytes in, a preprocessed ``size`` x ``size`` RGB array out.

Every path ends in ``preprocess.resize_and_crop`` so it matches ``reference_preprocess``.
JPEGs are decoded at a reduced DCT scale (``Image.draft``): libjpeg skips most of the IDCT
work and the resize starts from a much smaller image. PNG, WebP, GIF, BMP and TIFF go
through Pillow at full size; on a 1600x1200 photo-like image cv2.imdecode and
pyvips.thumbnail_buffer were within noise of Pillow for PNG and WebP (decode dominates, and
neither format can shrink much on load), and Pillow handles transparency, palettes and
EXIF the same way as the reference.

Failures are always ``ImgfleetError`` subclasses with a reason code; nothing else escapes.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from common.errors import ImgfleetError, PermanentError, Reason, TransientError
from workers.preprocess import INPUT_SIZE, resize_and_crop, to_rgb

DEFAULT_MAX_PIXELS = 50_000_000

_JPEG_EOI = b"\xff\xd9"
_PILLOW_FORMATS = {
    "jpeg": ["JPEG"],
    "png": ["PNG"],
    "webp": ["WEBP"],
    "gif": ["GIF"],
    "bmp": ["BMP"],
    "tiff": ["TIFF"],
}
# BITMAPINFOHEADER variants; checking the header size keeps "BM..." text from passing as BMP.
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
# ImageFile.LOAD_TRUNCATED_IMAGES is a process-wide flag; this lock keeps two recoveries in
# one process from racing on it (pool workers decode one image at a time anyway).
_TRUNCATED_FLAG_LOCK = threading.Lock()


@dataclass
class DecodeResult:
    pixels: np.ndarray  # uint8, size x size x 3, RGB, C-contiguous
    format: str  # from sniff_format
    width: int  # original, before EXIF rotation
    height: int
    recovered: bool  # a truncated file whose decodable part was used
    decode_ms: float
    path: str  # which decoder path produced the pixels, e.g. "pillow-draft"


def sniff_format(data: bytes) -> str | None:
    """Format from magic bytes only: names and content types lie."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if data.startswith(b"BM") and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    return None


def decode_image(
    data: bytes,
    *,
    size: int = INPUT_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    recover_truncated: bool = True,
) -> DecodeResult:
    """Decode and preprocess one image; raises only ImgfleetError subclasses."""
    started = time.perf_counter()
    if not data:
        raise PermanentError("zero-byte body", Reason.EMPTY)
    image_format = sniff_format(data)
    if image_format is None:
        raise PermanentError(f"unknown magic bytes {data[:8]!r}", Reason.NOT_AN_IMAGE)
    try:
        result = _decode(data, image_format, size, max_pixels, recover_truncated)
    except ImgfleetError:
        raise
    except Image.DecompressionBombError as exc:
        raise PermanentError(str(exc), Reason.TOO_MANY_PIXELS) from exc
    except MemoryError as exc:
        # The header passed max_pixels, so this is the host running short, not the image.
        raise TransientError("out of memory while decoding", Reason.INTERNAL) from exc
    except Exception as exc:  # any other decoder failure is a property of the bytes
        if _is_cut_short(data, image_format):
            raise PermanentError(
                f"{image_format} truncated: {type(exc).__name__}: {exc}", Reason.TRUNCATED
            ) from exc
        raise PermanentError(
            f"{image_format} undecodable: {type(exc).__name__}: {exc}", Reason.UNDECODABLE
        ) from exc
    result.decode_ms = (time.perf_counter() - started) * 1000.0
    return result


def _decode(
    data: bytes, image_format: str, size: int, max_pixels: int, recover_truncated: bool
) -> DecodeResult:
    with _open(data, image_format) as img:
        width, height = img.size
        # Image.open reads only the header, so this runs before any pixel memory exists.
        if width <= 0 or height <= 0:
            raise PermanentError(f"bad dimensions {width}x{height}", Reason.UNDECODABLE)
        if width * height > max_pixels:
            raise PermanentError(
                f"{width}x{height} exceeds {max_pixels} pixels", Reason.TOO_MANY_PIXELS
            )
        path = _prepare(img, image_format, size)
        try:
            img.load()
            return _finish(img, image_format, width, height, size, path, recovered=False)
        except OSError as exc:
            if not _is_truncation(exc):
                raise
            truncation = exc
    # Only JPEG is recovered: libjpeg degrades gracefully (the tail goes grey), and broken
    # JPEGs are the common case on catalogue CDNs. A truncated PNG loses whole rows.
    if not recover_truncated or image_format != "jpeg":
        raise PermanentError(f"{image_format} truncated: {truncation}", Reason.TRUNCATED)
    return _recover(data, image_format, width, height, size, truncation)


def _open(data: bytes, image_format: str) -> ImageFile.ImageFile:
    # Restricting Pillow to the sniffed format stops it from guessing a different one.
    img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS[image_format])
    assert isinstance(img, ImageFile.ImageFile)
    return img


def _prepare(img: ImageFile.ImageFile, image_format: str, size: int) -> str:
    """Set up shrink-on-load where the format has it; returns the path name."""
    if image_format != "jpeg":
        return "pillow"
    # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= the
    # request; asking for size x size keeps the shorter side >= size.
    full_size = img.size
    img.draft("RGB", (size, size))
    return "pillow-draft" if img.size != full_size else "pillow"


def _finish(
    img: Image.Image,
    image_format: str,
    width: int,
    height: int,
    size: int,
    path: str,
    *,
    recovered: bool,
) -> DecodeResult:
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block should not lose a good image
        oriented = img
    rgb = np.asarray(to_rgb(oriented), dtype=np.uint8)
    pixels = resize_and_crop(rgb, size)
    return DecodeResult(
        pixels=pixels,
        format=image_format,
        width=width,
        height=height,
        recovered=recovered,
        decode_ms=0.0,
        path=path,
    )


def _is_truncation(exc: OSError) -> bool:
    # Pillow's strict load raises "image file is truncated (N bytes not processed)" when
    # the stream ends before the decoder is done (including a JPEG that lacks only EOI).
    return "truncated" in str(exc)


def _is_cut_short(data: bytes, image_format: str) -> bool:
    """Whether the container says more bytes were due, for formats whose failures
    otherwise look like plain corruption."""
    if image_format == "webp":
        declared_bytes = int.from_bytes(data[4:8], "little") + 8
        return len(data) < declared_bytes
    if image_format == "png":
        return b"IEND" not in data[-12:]
    return False


def _recover(
    data: bytes,
    image_format: str,
    width: int,
    height: int,
    size: int,
    truncation: OSError,
) -> DecodeResult:
    # An appended EOI marker makes libjpeg finish the scan with what it has (the rest is
    # filled grey), with no process-wide flag involved.
    try:
        with _open(data + _JPEG_EOI, image_format) as img:
            path = _prepare(img, image_format, size)
            img.load()
            return _finish(img, image_format, width, height, size, path + "+eoi", recovered=True)
    except OSError:
        pass  # cut inside a marker segment (e.g. a DHT between progressive scans)
    with _TRUNCATED_FLAG_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with _open(data, image_format) as img:
                path = _prepare(img, image_format, size)
                img.load()
                return _finish(
                    img, image_format, width, height, size, path + "+truncated", recovered=True
                )
        except OSError as exc:
            raise PermanentError(
                f"{image_format} truncated beyond recovery: {truncation}", Reason.TRUNCATED
            ) from exc
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
