"""CPU image decode: bytes in, a model's preprocessed ``size`` x ``size`` RGB array out.

Every path ends in ``preprocess.resize_and_crop`` so it matches ``reference_preprocess``;
``tests/unit/workers/test_decode_paths.py`` holds each path to the reference within a stated
tolerance. The header is always read first with Pillow (no pixel memory yet), so the pixel
cap applies before any library allocates the image, whichever library decodes it.

Path per format, chosen from measurements on a 2-core VM, 800-2000 px images, one core,
bytes to 224x224 (images/s; naive Pillow open + convert + resize in brackets):

- JPEG: Pillow ``draft`` (DCT-domain downscale). Baseline 278 (55), progressive 129 (44).
  OpenCV ``IMREAD_REDUCED_*`` (290 / 115) and simplejpeg (295 / 115) were within noise,
  but Pillow alone also handles CMYK / Adobe JPEGs, EXIF orientation and truncated files
  the way the reference does, so it stays the JPEG path.
- PNG: libvips decode (sequential) + our resize: 36 vs Pillow 27 (decode alone 60 vs 33).
- WebP: OpenCV ``imdecode``: 66 vs Pillow 45; with alpha 27 vs 14 (compositing in Pillow).
  Animated WebP and WebP with EXIF go to Pillow (first frame, orientation).
- GIF, BMP, TIFF and anything a fast path refuses: Pillow.
- An embedded ICC profile is converted to sRGB: on the Pillow path by
  ``preprocess.to_srgb`` (littlecms, one cached transform per profile), on the libvips
  PNG path by libvips's own littlecms; WebP with a profile goes to Pillow (OpenCV drops
  profiles). Cost per 1600x1200 image on one core (without -> with an Adobe RGB
  profile): JPEG 6.4 -> 9.3 ms, PNG 49 -> 72 ms, WebP 28 -> 69 ms (Pillow's path).

When the format's own path fails on the bytes, the other decoders are tried (``_FALLBACKS``:
libvips, Pillow, OpenCV), under the same pixel cap, read from a header before any of them
allocates; the result's ``path`` ends in ``-fallback``. A JPEG a fallback decoder reads only
in part (libjpeg's grey fill below) is marked recovered with its decoded fraction.

Failures are always ``JobFailure`` subclasses with a reason code; nothing else escapes.
"""

from __future__ import annotations

import io
import os
import threading
import time
import warnings

import cv2
import numpy as np
import pyvips
from PIL import Image, ImageFile, ImageOps

import common.defaults as defaults
from common.errors import JobFailure, PermanentError, Reason, TransientError
from workers.decode.preprocess import (
    DEFAULT_PREPROCESS,
    Preprocess,
    converted_profile,
    resize_and_crop,
    to_rgb,
)
from workers.decode.types import FALLBACK_SUFFIX, DecodeResult

# PIL warns (DecompressionBombWarning) on the terminal for images over its own pixel limit
# before our max_pixels check, right after the header read, rejects them with a clean
# too_many_pixels reason; the check owns the limit, so the warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# The configuration's default (worker.max_pixels), for callers that decode without settings.
DEFAULT_MAX_PIXELS = defaults.MAX_PIXELS
# OpenCV refuses images over this many pixels from their header, before allocating; it
# reads the variable once, on first use. Set before any decode (a value given by the
# environment is kept), it is what lets OpenCV try a file no other header parser reads.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))
_OPENCV_MAX_PIXELS = int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])

_JPEG_EOI = b"\xff\xd9"
_PILLOW_FORMATS = {
    "avif": ["AVIF"],  # Pillow's own AVIF plugin (Pillow >= 11.3 wheels)
    "heif": ["HEIF"],  # pillow-heif's plugin, registered at import below
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
# libjpeg fills the blocks it never received with a zero DC coefficient: mid grey.
_JPEG_FILL_RGB = (128, 128, 128)
# VP8X feature flags (WebP container spec): animation and EXIF need Pillow's handling.
_VP8X_ANIMATION = 0x02
_VP8X_EXIF = 0x08
_VP8X_ICC = 0x20


def configure_decoder_threads() -> None:
    """One thread per decoder: parallelism comes from the pool's processes, and native
    thread pools in every process would only fight over the same cores."""
    cv2.setNumThreads(1)
    pyvips.concurrency_set(1)
    pyvips.cache_set_max(0)  # each buffer is decoded once; caching only holds memory


# ISO base media files (HEIF / AVIF): the major brand of the ftyp box says which.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
# Image formats recognised but read by no decoder here: their own reason code, so a
# catalogue that serves them is told so rather than "not an image".
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\x0a", "jpeg-xl"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpeg-xl"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg-2000"),
    (b"\xff\x4f\xff\x51", "jpeg-2000"),
    (b"8BPS", "psd"),
    (b"\x00\x00\x01\x00", "ico"),
)


def _register_heif() -> bool:
    try:
        import pillow_heif
    except ImportError:  # an optional decoder: HEIF is then an unsupported format
        return False
    pillow_heif.register_heif_opener()
    return True


_HEIF_AVAILABLE = _register_heif()
_AVIF_AVAILABLE = "AVIF" in Image.registered_extensions().values()


def unsupported_format(data: bytes) -> str | None:
    """The name of an image format recognised but not decoded here, or None."""
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS and not _HEIF_AVAILABLE:
            return "heif"
        if brand in _AVIF_BRANDS and not _AVIF_AVAILABLE:
            return "avif"
    head = data[:256].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return "svg"
    return None


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
    if (
        data.startswith(b"BM")
        and (
            int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES
            # A damaged info header, but the file header's size field is this file's length.
            or (len(data) > 54 and int.from_bytes(data[2:6], "little") == len(data))
        )
    ):
        return "bmp"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _AVIF_BRANDS and _AVIF_AVAILABLE:
            return "avif"
        if brand in _HEIF_BRANDS and _HEIF_AVAILABLE:
            return "heif"
    return None


def image_format_of(data: bytes) -> str:
    """The sniffed format of bytes that can be decoded here; else the refusal
    (``empty``, ``unsupported_format``, ``not_an_image``), before any decoder runs."""
    if not data:
        raise PermanentError("zero-byte body", Reason.EMPTY)
    image_format = sniff_format(data)
    if image_format is not None:
        return image_format
    unsupported = unsupported_format(data)
    if unsupported is not None:
        raise PermanentError(f"{unsupported} images are not supported", Reason.UNSUPPORTED_FORMAT)
    raise PermanentError(f"unknown magic bytes {data[:8]!r}", Reason.NOT_AN_IMAGE)


def decode_image(
    data: bytes,
    *,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    recover_truncated: bool = True,
    min_decoded_fraction: float = 0.0,
    fast_paths: bool = True,
    shrink_on_load: bool = True,
) -> DecodeResult:
    """Decode and preprocess one image; raises only JobFailure subclasses.

    ``min_decoded_fraction``: a recovered (truncated) image with less of its rows decoded
    than this is refused as ``truncated``. ``fast_paths=False`` forces Pillow everywhere
    (tests compare the two); ``shrink_on_load=False`` decodes JPEGs at full size (the
    exact reference pixels, at about half the speed on large photos).
    """
    started = time.perf_counter()
    image_format = image_format_of(data)
    try:
        result = _decode(
            data,
            image_format,
            preprocess,
            max_pixels,
            recover_truncated,
            fast_paths,
            shrink_on_load and fast_paths,
        )
    except JobFailure:
        raise
    except Image.DecompressionBombError as exc:
        raise PermanentError(str(exc), Reason.TOO_MANY_PIXELS) from exc
    except MemoryError as exc:
        # The header passed max_pixels, so this is the host running short, not the image.
        raise TransientError("out of memory while decoding", Reason.INTERNAL) from exc
    except Exception as exc:  # any other decoder failure is a property of the bytes
        detail = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        if _is_cut_short(data, image_format):
            raise PermanentError(f"{image_format} truncated: {detail}", Reason.TRUNCATED) from exc
        raise PermanentError(f"{image_format} undecodable: {detail}", Reason.UNDECODABLE) from exc
    if result.recovered and result.decoded_fraction < min_decoded_fraction:
        raise PermanentError(
            f"{image_format} truncated: only {result.decoded_fraction:.0%} of the rows "
            f"decodable (minimum {min_decoded_fraction:.0%})",
            Reason.TRUNCATED,
        )
    result.decode_ms = (time.perf_counter() - started) * 1000.0
    return result


def probe(data: bytes, image_format: str) -> tuple[int, int]:
    """(width, height) from the header alone; no pixel memory is allocated."""
    with _open(data, image_format) as img:
        return img.size


def _decode(
    data: bytes,
    image_format: str,
    spec: Preprocess,
    max_pixels: int,
    recover_truncated: bool,
    fast_paths: bool,
    draft: bool,
) -> DecodeResult:
    """The format's own path; when its decoder fails on the bytes, or reads only part of
    them, the other decoders (``fast_paths=False``, the Pillow-only reference mode that
    tests compare against, tries no others)."""
    try:
        result = _decode_primary(
            data, image_format, spec, max_pixels, recover_truncated, fast_paths, draft
        )
    except (Image.DecompressionBombError, MemoryError):
        raise  # the pixel cap, or the host running short: not a decoder's limit
    except PermanentError as exc:
        # Pillow calls damage in the middle of a GIF or TIFF stream "truncated"; a decoder
        # that reads the whole picture settles it. A real cut is read by none of them.
        if not (fast_paths and exc.reason is Reason.TRUNCATED):
            raise
        whole = _fallback(data, image_format, spec, max_pixels)
        if whole is None or whole.recovered:
            raise
        return whole
    except JobFailure:
        raise
    except Exception:
        if not fast_paths:
            raise
        fallback = _fallback(data, image_format, spec, max_pixels)
        if fallback is None:
            raise
        return fallback
    if result.recovered and fast_paths:
        # Pillow stopped part-way (the rest is libjpeg's grey): a bogus marker in the
        # entropy data stops libjpeg under Pillow, while OpenCV's libjpeg-turbo and libvips
        # read past it. The more complete picture wins; a real cut stays Pillow's.
        other = _fallback(data, image_format, spec, max_pixels)
        if other is not None and other.decoded_fraction > result.decoded_fraction:
            return other
    return result


def _decode_primary(
    data: bytes,
    image_format: str,
    spec: Preprocess,
    max_pixels: int,
    recover_truncated: bool,
    fast_paths: bool,
    draft: bool,
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
        if fast_paths and image_format == "png" and not _png_has(data, (b"eXIf",)):
            return _decode_png_vips(data, width, height, spec)
        if fast_paths and image_format == "webp" and _is_simple_webp(data):
            return _decode_webp_cv2(data, width, height, spec)
        path = _prepare(img, image_format, spec, draft)
        try:
            img.load()
            return _finish(img, image_format, width, height, spec, path, recovered=False)
        except OSError as exc:
            if not _is_truncation(exc):
                raise
            truncation = exc
    # Only JPEG is recovered: libjpeg degrades gracefully (the tail goes grey), and broken
    # JPEGs are the common case on catalogue CDNs. A truncated PNG loses whole rows.
    if not recover_truncated or image_format != "jpeg":
        raise PermanentError(f"{image_format} truncated: {truncation}", Reason.TRUNCATED)
    return _recover(data, image_format, width, height, spec, truncation, draft)


# Which decoders to try, in order, when a format's own path fails: each reads streams the
# others reject (libpng through OpenCV accepts a bad CRC in an ancillary PNG chunk that
# Pillow refuses; libvips reads some PNGs Pillow cannot and the other way round; OpenCV's
# libjpeg-turbo decodes past corrupt entropy data).
_FALLBACKS: dict[str, tuple[str, ...]] = {
    "jpeg": ("opencv", "vips"),
    "gif": ("vips", "opencv"),
    "bmp": ("opencv",),  # libvips reads no BMP
    "png": ("vips", "pillow", "opencv"),
    "webp": ("pillow", "opencv"),
}
_DEFAULT_FALLBACKS = ("opencv", "vips")


def _fallback(
    data: bytes, image_format: str, spec: Preprocess, max_pixels: int
) -> DecodeResult | None:
    """The first other decoder that reads the bytes, or None.

    The pixel cap holds here too: the dimensions come from a header (Pillow's, else
    libvips's, which reads only the header until pixels are asked for) and are checked
    before any fallback decoder allocates; with no readable header nothing is tried.
    """
    size = _header_size(data, image_format)
    if size is None:
        # No header any decoder parses (a bit flipped in the WebP or BMP header): only
        # OpenCV, whose own cap checks the size it parses before allocating, may try.
        return _headerless_opencv(data, image_format, spec, max_pixels)
    width, height = size
    if width <= 0 or height <= 0:
        return None
    if width * height > max_pixels:
        raise PermanentError(
            f"{width}x{height} exceeds {max_pixels} pixels", Reason.TOO_MANY_PIXELS
        )
    for name in _FALLBACKS.get(image_format, _DEFAULT_FALLBACKS):
        try:
            rgb = _FALLBACK_DECODERS[name](data, image_format)
        except Exception:
            continue
        if rgb.shape[0] * rgb.shape[1] > max_pixels:
            continue  # a header that lied about its size: the cap is not negotiable
        return _fallback_result(rgb, image_format, width, height, spec, name)
    return None


def _fallback_result(
    rgb: np.ndarray, image_format: str, width: int, height: int, spec: Preprocess, name: str
) -> DecodeResult:
    # libjpeg fills what it could not decode with mid grey: that part is not picture.
    fraction = _filled_row_fraction(rgb) if image_format == "jpeg" else 1.0
    return _decoded(
        rgb,
        image_format,
        width,
        height,
        spec,
        path=f"{name}{FALLBACK_SUFFIX}",
        recovered=fraction < 1.0,
        decoded_fraction=fraction,
    )


def _headerless_opencv(
    data: bytes, image_format: str, spec: Preprocess, max_pixels: int
) -> DecodeResult | None:
    if max_pixels < _OPENCV_MAX_PIXELS:
        return None  # OpenCV's cap is looser than this call's: no decoder may go first
    try:
        rgb = _opencv_rgb(data, image_format)
    except Exception:
        return None
    height, width = rgb.shape[:2]
    return _fallback_result(rgb, image_format, width, height, spec, "opencv")


def _header_size(data: bytes, image_format: str) -> tuple[int, int] | None:
    try:
        with _open(data, image_format) as img:
            return img.size
    except Exception:
        pass
    try:
        header = pyvips.Image.new_from_buffer(data, "", access="sequential")
        return int(header.width), int(header.height)
    except pyvips.Error:
        return None


def _pillow_rgb(data: bytes, image_format: str) -> np.ndarray:
    with _open(data, image_format) as img:
        img.load()
        return _oriented_rgb(img)[0]


def _oriented_rgb(img: Image.Image) -> tuple[np.ndarray, str]:
    """A loaded image, EXIF-oriented, as sRGB; and the profile it was converted from."""
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block should not lose a good image
        oriented = img
    colour_from = converted_profile(oriented.info.get("icc_profile"))
    return np.asarray(to_rgb(oriented), dtype=np.uint8), colour_from


def _opencv_rgb(data: bytes, image_format: str) -> np.ndarray:
    buffer = np.frombuffer(data, np.uint8)
    if image_format == "jpeg":
        # IMREAD_COLOR applies the EXIF orientation, as the reference does; JPEG has no alpha.
        array = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        if array is None:
            raise ValueError("OpenCV could not decode the stream")
        return np.ascontiguousarray(cv2.cvtColor(array, cv2.COLOR_BGR2RGB))
    # IMREAD_UNCHANGED keeps alpha and skips OpenCV's own EXIF handling.
    array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("OpenCV could not decode the stream")
    if array.dtype == np.uint16:
        array = (array.astype(np.uint16) >> 8).astype(np.uint8)  # the reference keeps the high byte
    elif array.dtype != np.uint8:
        raise ValueError(f"OpenCV sample type {array.dtype} not supported")
    if array.ndim == 3 and array.shape[2] == 4:
        rgba = Image.fromarray(cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA))
        return np.asarray(to_rgb(rgba), dtype=np.uint8)
    if array.ndim == 3:
        return np.ascontiguousarray(cv2.cvtColor(array, cv2.COLOR_BGR2RGB))
    return _as_rgb(array)


def _vips_rgb(data: bytes, image_format: str) -> np.ndarray:
    img = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="error")
    img = img.autorot()  # the EXIF orientation, as the reference applies it
    return _vips_to_rgb(_vips_srgb(img)[0])


_FALLBACK_DECODERS = {"pillow": _pillow_rgb, "opencv": _opencv_rgb, "vips": _vips_rgb}


def _open(data: bytes, image_format: str) -> ImageFile.ImageFile:
    # Restricting Pillow to the sniffed format stops it from guessing a different one.
    img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS[image_format])
    assert isinstance(img, ImageFile.ImageFile)
    return img


def _prepare(img: ImageFile.ImageFile, image_format: str, spec: Preprocess, draft: bool) -> str:
    """Set up shrink-on-load where the format has it (and ``draft``); returns the path name."""
    if image_format != "jpeg" or not draft:
        return "pillow"
    # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= the
    # request; asking for a square of the scale size keeps the shorter side >= it.
    full_size = img.size
    request = spec.scale_size
    img.draft("RGB", (request, request))
    return "pillow-draft" if img.size != full_size else "pillow"


def _finish(
    img: Image.Image,
    image_format: str,
    width: int,
    height: int,
    spec: Preprocess,
    path: str,
    *,
    recovered: bool,
) -> DecodeResult:
    decoded_fraction = _decoded_row_fraction(img) if recovered else 1.0
    rgb, colour_from = _oriented_rgb(img)
    return _decoded(
        rgb,
        image_format,
        width,
        height,
        spec,
        path=path,
        recovered=recovered,
        decoded_fraction=decoded_fraction,
        colour_from=colour_from,
    )


def _decoded_row_fraction(img: Image.Image) -> float:
    """Share of rows above the grey fill libjpeg leaves where a baseline JPEG was cut.

    A progressive JPEG cut after its first scan has every row (at lower quality), so it
    counts as whole. A real photo whose bottom rows are exactly mid grey would be
    under-counted; product shots are on white, so that costs little.
    """
    return _filled_row_fraction(np.asarray(img.convert("RGB")))


def _filled_row_fraction(rgb: np.ndarray) -> float:
    """Share of rows above a trailing run of rows that are all libjpeg's grey fill."""
    filled = (rgb == np.asarray(_JPEG_FILL_RGB, np.uint8)).all(axis=(1, 2))
    height = len(filled)
    # argmin finds the first non-fill row counted from the bottom: the fill's height.
    trailing = height if filled.all() else int(np.argmin(filled[::-1]))
    return 1.0 - trailing / max(height, 1)


def _decode_png_vips(data: bytes, width: int, height: int, spec: Preprocess) -> DecodeResult:
    # fail_on="error" turns a damaged or cut stream into an exception instead of a
    # silently partial image.
    img = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="error")
    img, colour_from = _vips_srgb(img)
    return _decoded(
        _vips_to_rgb(img),
        "png",
        width,
        height,
        spec,
        path="vips",
        colour_from=colour_from,
    )


def _vips_srgb(img: pyvips.Image) -> tuple[pyvips.Image, str]:
    """An embedded ICC profile converted to sRGB by libvips's littlecms, as
    ``preprocess.to_srgb`` does on the Pillow path (perceptual intent, 8-bit out); and the
    profile it was converted from ("": none, sRGB already, or unreadable)."""
    if not img.get_typeof("icc-profile-data"):
        return img, ""
    colour_from = converted_profile(bytes(img.get("icc-profile-data")))
    if not colour_from:
        return img, ""
    try:
        return img.icc_transform("srgb", intent="perceptual"), colour_from
    except pyvips.Error:
        return img, ""  # a profile littlecms cannot read: the pixels are taken as sRGB


def _vips_to_rgb(img: pyvips.Image) -> np.ndarray:
    if img.format == "ushort":
        # The reference keeps the high byte of 16-bit samples (v >> 8), alpha included,
        # and composites afterwards.
        img = (img >> 8).cast("uchar")
    elif img.format != "uchar":
        raise PermanentError(f"sample format {img.format} not supported", Reason.UNDECODABLE)
    if img.hasalpha():
        # max_alpha explicitly: after the cast above the image may still say "rgb16",
        # and flatten would then read alpha on a 0..65535 scale.
        img = img.flatten(background=[255] * (img.bands - 1), max_alpha=255)
    array = np.ndarray(
        buffer=img.write_to_memory(), dtype=np.uint8, shape=(img.height, img.width, img.bands)
    )
    return _as_rgb(array)


def _png_has(data: bytes, chunk_types: tuple[bytes, ...]) -> bool:
    """Whether any of these chunk types appears (a cheap byte search: a false positive only
    sends the image to Pillow, the reference decoder)."""
    return any(kind in data for kind in chunk_types)


def _is_simple_webp(data: bytes) -> bool:
    chunk = data[12:16]
    if chunk in (b"VP8 ", b"VP8L"):
        return True
    if chunk == b"VP8X" and len(data) > 20:
        return not data[20] & (_VP8X_ANIMATION | _VP8X_EXIF | _VP8X_ICC)
    return False


def _decode_webp_cv2(data: bytes, width: int, height: int, spec: Preprocess) -> DecodeResult:
    return _decoded(_opencv_rgb(data, "webp"), "webp", width, height, spec, path="opencv")


def _decoded(
    rgb: np.ndarray,
    image_format: str,
    width: int,
    height: int,
    spec: Preprocess,
    *,
    path: str,
    recovered: bool = False,
    decoded_fraction: float = 1.0,
    colour_from: str = "",
) -> DecodeResult:
    """The result of a decode: ``rgb`` resized and cropped to ``size``; the decode time is
    the caller's to fill in."""
    return DecodeResult(
        pixels=resize_and_crop(rgb, spec),
        format=image_format,
        width=width,
        height=height,
        recovered=recovered,
        decode_ms=0.0,
        path=path,
        decoded_fraction=decoded_fraction,
        colour_from=colour_from,
    )


def _as_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if array.shape[2] == 3:
        return np.ascontiguousarray(array)
    raise PermanentError(f"unexpected band count {array.shape[2]}", Reason.UNDECODABLE)


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
    spec: Preprocess,
    truncation: OSError,
    draft: bool,
) -> DecodeResult:
    # An appended EOI marker makes libjpeg finish the scan with what it has (the rest is
    # filled grey), with no process-wide flag involved.
    try:
        with _open(data + _JPEG_EOI, image_format) as img:
            path = _prepare(img, image_format, spec, draft)
            img.load()
            return _finish(img, image_format, width, height, spec, path + "+eoi", recovered=True)
    except OSError:
        pass  # cut inside a marker segment (e.g. a DHT between progressive scans)
    with _TRUNCATED_FLAG_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with _open(data, image_format) as img:
                path = _prepare(img, image_format, spec, draft)
                img.load()
                return _finish(
                    img, image_format, width, height, spec, path + "+truncated", recovered=True
                )
        except OSError as exc:
            raise PermanentError(
                f"{image_format} truncated beyond recovery: {truncation}", Reason.TRUNCATED
            ) from exc
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
