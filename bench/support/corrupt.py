"""The damaged-image corpus of ``bench/robustness.py``, and its scoring.

``build_corpus(seed, spec)`` makes a few clean photographic-ish images (a smooth gradient,
flat and outlined shapes, sensor-like noise; 200-1200 px a side), encodes each as every
base format in ``BASES`` and damages the encodings in every way of ``DAMAGE_KINDS``. Every
file is a ``CorruptFile``: its bytes and a record (name, base format, damage kind, whether
it is a decompression bomb, what exactly was done, the clean file it came from). The same
seed and spec give the same bytes: each file draws from its own random stream, keyed by
seed, source and damage, so changing one kind's count does not move the others.

``score(records, statuses)`` turns one status per contender per file (``DECODED``,
``REFUSED``, ``CRASH``, ``HANG``, ``NOT_ATTEMPTED``, ``ERROR``) into the figures: the union
of files some decoder alone reads (bombs excluded), imgfleet's share of it (``ratio``), the
files imgfleet misses and which decoder read them, and the bombs imgfleet refused.

Only numpy, Pillow and the standard library: importable by a test without the decoders.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Statuses of one contender on one file.
DECODED = "decoded"  # pixels back, nothing raised
REFUSED = "refused"  # an exception (imgfleet: a JobFailure) or no pixels (OpenCV's None)
CRASH = "crash"  # the decoding process died (a segfault, an abort)
HANG = "hang"  # no answer within the per-file timeout
NOT_ATTEMPTED = "not_attempted"  # a bomb a decoder alone was not given
ERROR = "error"  # imgfleet only: something other than a JobFailure escaped
STATUSES = (DECODED, REFUSED, CRASH, HANG, NOT_ATTEMPTED, ERROR)

IMGFLEET = "imgfleet"
ALONE = ("pillow", "opencv", "vips")
CONTENDERS = (IMGFLEET, *ALONE)

# The worker's max_pixels: a bomb is a header that claims more than this.
PIXEL_CAP = 50_000_000

BASES = (
    "jpeg-baseline",
    "jpeg-progressive",
    "png-rgb",
    "png-rgba",
    "png-palette",
    "png-grey16",
    "webp-lossy",
    "webp-lossless",
    "webp-alpha",
    "gif",
    "bmp",
    "tiff",
)
TEXT_BASE = "text"  # the base of bodies that never were an image
SUFFIXES = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tif"}

# Damage kinds, every one of which each corpus holds. Those after the generic ones apply to
# one family only (png-*, jpeg-*); the last ones are not made from a clean file.
GENERIC_DAMAGES = (
    "clean",  # the control: the encoding as it came out of the encoder
    "wrong-extension",  # clean bytes under another format's suffix
    "truncate",  # cut at 1%..99% of the file
    "bitflip-header",  # 1-2 bits flipped in the header region (after the magic number)
    "bitflip-data",  # 1-4 bits flipped in the entropy-coded / IDAT / pixel data
    "zeroed-tail",  # the last 10-70% of the file overwritten with zeros
)
PNG_DAMAGES = (
    "png-bad-crc-ancillary",  # tEXt / gAMA / pHYs with a CRC that does not match
    "png-bad-crc-critical",  # IHDR / PLTE / IDAT with a CRC that does not match
    "png-unknown-critical",  # a critical chunk type no decoder knows, valid CRC
    "png-reordered-chunks",  # IDATs swapped, PLTE after IDAT, ancillary after IDAT, ...
    "png-missing-iend",
    "png-duplicate-ihdr",
)
JPEG_DAMAGES = (
    "jpeg-bogus-marker",  # FF xx markers inserted inside entropy-coded data
    "jpeg-missing-dht",
    "jpeg-duplicate-dht",
    "jpeg-missing-dqt",
    "jpeg-duplicate-dqt",
)
OTHER_DAMAGES = ("zero-bytes", "zero-filled", "html-body", "text-body", "bomb")
DAMAGE_KINDS = GENERIC_DAMAGES + PNG_DAMAGES + JPEG_DAMAGES + OTHER_DAMAGES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libpng's default IDAT size: large PNGs come in many IDAT chunks, which the reordering
# damages need (Pillow writes one IDAT per 64 KiB buffer).
PNG_IDAT_SIZE = 8192
UNKNOWN_CRITICAL_TYPES = (b"CaRt", b"DrOp", b"ZiPp")  # critical, private, safe-to-copy


@dataclass(frozen=True)
class CorruptFile:
    """One corpus file and its record."""

    name: str
    base: str  # one of BASES, TEXT_BASE, or a bare family ("png") for a bomb
    damage: str  # one of DAMAGE_KINDS
    is_bomb: bool
    data: bytes = field(repr=False)
    detail: str = ""  # what exactly was done (offsets, chunk, marker)
    parent: str | None = None  # the clean file it was made from

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "damage": self.damage,
            "is_bomb": self.is_bomb,
            "bytes": len(self.data),
            "detail": self.detail,
            "parent": self.parent,
        }


@dataclass(frozen=True)
class CorpusSpec:
    sources: int  # clean images, each encoded as every base
    truncations: int  # per clean file
    header_flips: int  # per clean file
    data_flips: int  # per clean file
    bomb_dims: tuple[tuple[int, int], ...]  # what the header-lie bombs claim
    min_side: int = 200
    max_side: int = 1200


# ~300 and ~1500 files (quick: 2 sources; full: 6, more cuts and flips, two bomb sizes).
QUICK = CorpusSpec(
    sources=2, truncations=3, header_flips=2, data_flips=2, bomb_dims=((30000, 30000),)
)
FULL = CorpusSpec(
    sources=6,
    truncations=7,
    header_flips=4,
    data_flips=4,
    bomb_dims=((30000, 30000), (65535, 65535)),
)


def family(base: str) -> str:
    """``jpeg-progressive`` -> ``jpeg``."""
    return base.split("-", 1)[0]


# --- clean images ------------------------------------------------------------------------


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Photographic-ish RGB: a smooth background, a few shapes, a soft edge, noise."""
    small = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        x1 = x0 + int(rng.integers(width // 10, width // 2))
        y1 = y0 + int(rng.integers(height // 10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        outline = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=outline, width=3)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour, outline=outline, width=3)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    # Sigma 4 grain: between a studio product shot and a phone photo; it keeps the
    # encoders honest (flat synthetic areas compress to almost nothing).
    noise = rng.normal(0, 4.0, (height, width, 3))
    pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _alpha(width: int, height: int) -> Image.Image:
    """A left-to-right fade with a fully transparent band: real transparency to keep."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1))
    ramp[:, : width // 8] = 0
    return Image.fromarray(ramp.astype(np.uint8), "L")


def encode_bases(img: Image.Image, source: int) -> dict[str, bytes]:
    """The clean encodings of one image, one per base."""
    out: dict[str, bytes] = {}

    def save(base: str, image: Image.Image, fmt: str, **params: Any) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt, **params)
        out[base] = buf.getvalue()

    rgba = img.copy()
    rgba.putalpha(_alpha(*img.size))
    # Fast octree: 0.05 s against median cut's 0.6 s on 1200 px, and a palette is a palette.
    palette = img.quantize(256, method=Image.Quantize.FASTOCTREE)
    # Odd sources get optimised Huffman tables, even ones the standard tables: the two
    # kinds of baseline JPEG on catalogue CDNs, which a missing DHT affects differently.
    save("jpeg-baseline", img, "JPEG", quality=85, optimize=source % 2 == 1)
    save("jpeg-progressive", img, "JPEG", quality=85, progressive=True)
    save("png-rgb", img, "PNG")
    save("png-rgba", rgba, "PNG")
    save("png-palette", palette, "PNG")
    grey16 = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)  # mode I;16
    save("png-grey16", grey16, "PNG")
    save("webp-lossy", img, "WEBP", quality=80)
    # method 0: half the encode time of the default on 1200 px, same bitstream features.
    save("webp-lossless", img, "WEBP", lossless=True, method=0)
    save("webp-alpha", rgba, "WEBP", quality=80)
    save("gif", palette, "GIF")
    save("bmp", img, "BMP")
    save("tiff", img, "TIFF", compression="tiff_lzw")
    for base in ("png-rgb", "png-rgba", "png-palette", "png-grey16"):
        out[base] = _png_catalogue_layout(out[base])
    return out


# --- PNG ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PngChunk:
    type: bytes
    data: bytes
    crc: int

    @staticmethod
    def make(chunk_type: bytes, data: bytes) -> PngChunk:
        return PngChunk(chunk_type, data, zlib.crc32(chunk_type + data))

    @property
    def crc_ok(self) -> bool:
        return self.crc == zlib.crc32(self.type + self.data)

    @property
    def critical(self) -> bool:
        return self.type[:1].isupper()

    def encode(self) -> bytes:
        return (
            struct.pack(">I", len(self.data)) + self.type + self.data + struct.pack(">I", self.crc)
        )


def png_chunks(data: bytes) -> list[PngChunk]:
    """The chunks of a PNG as stored (CRCs not checked); stops at the end of the bytes."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if pos + 12 + length > len(data):
            break
        chunk_type = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        chunks.append(PngChunk(chunk_type, body, crc))
        pos += 12 + length
    return chunks


def png_bytes(chunks: Sequence[PngChunk]) -> bytes:
    return PNG_SIGNATURE + b"".join(chunk.encode() for chunk in chunks)


def _png_catalogue_layout(data: bytes) -> bytes:
    """Pillow's PNG re-laid the way common encoders write it: gAMA, pHYs and tEXt before
    the image data, and the data in 8 KiB IDAT chunks."""
    chunks = png_chunks(data)
    idat = b"".join(c.data for c in chunks if c.type == b"IDAT")
    head = [c for c in chunks if c.type not in (b"IDAT", b"IEND")]
    extra = [
        PngChunk.make(b"gAMA", struct.pack(">I", 45455)),
        PngChunk.make(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
        PngChunk.make(b"tEXt", b"Software\0imgfleet bench corpus"),
    ]
    idats = [
        PngChunk.make(b"IDAT", idat[i : i + PNG_IDAT_SIZE])
        for i in range(0, len(idat), PNG_IDAT_SIZE)
    ]
    return png_bytes([*head, *extra, *idats, PngChunk.make(b"IEND", b"")])


def _bad_crc(chunk: PngChunk, rng: np.random.Generator) -> PngChunk:
    return PngChunk(chunk.type, chunk.data, chunk.crc ^ int(rng.integers(1, 2**32)))


def png_damage(kind: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One of PNG_DAMAGES on a clean PNG; returns (bytes, detail)."""
    chunks = png_chunks(data)
    types = [c.type for c in chunks]
    first_idat = types.index(b"IDAT")
    idat_at = [i for i, t in enumerate(types) if t == b"IDAT"]
    if kind == "png-bad-crc-ancillary":
        where = [i for i, c in enumerate(chunks) if not c.critical]
        i = int(rng.choice(where))
        chunks[i] = _bad_crc(chunks[i], rng)
        return png_bytes(chunks), f"bad CRC on {chunks[i].type.decode()}"
    if kind == "png-bad-crc-critical":
        where = [i for i, c in enumerate(chunks) if c.critical and c.type != b"IEND"]
        i = int(rng.choice(where))
        chunks[i] = _bad_crc(chunks[i], rng)
        nth = f" #{idat_at.index(i)}" if chunks[i].type == b"IDAT" else ""
        return png_bytes(chunks), f"bad CRC on {chunks[i].type.decode()}{nth}"
    if kind == "png-unknown-critical":
        chunk_type = UNKNOWN_CRITICAL_TYPES[int(rng.integers(len(UNKNOWN_CRITICAL_TYPES)))]
        body = rng.integers(0, 256, int(rng.integers(4, 64)), dtype=np.uint8).tobytes()
        chunks.insert(first_idat, PngChunk.make(chunk_type, body))
        return png_bytes(chunks), f"{chunk_type.decode()} before IDAT"
    if kind == "png-reordered-chunks":
        variants = ["idat-swap", "ancillary-after-idat", "iend-before-idat", "ihdr-not-first"]
        if b"PLTE" in types:
            variants.append("plte-after-idat")
        variant = variants[int(rng.integers(len(variants)))]
        if variant == "idat-swap" and len(idat_at) < 2:
            variant = "ancillary-after-idat"
        if variant == "idat-swap":
            a = int(rng.integers(0, len(idat_at) - 1))
            i, j = idat_at[a], idat_at[a + 1]
            chunks[i], chunks[j] = chunks[j], chunks[i]
            return png_bytes(chunks), f"IDAT #{a} and #{a + 1} swapped"
        if variant == "ihdr-not-first":
            chunks[0], chunks[1] = chunks[1], chunks[0]
            return png_bytes(chunks), f"{chunks[0].type.decode()} before IHDR"
        moved_types = {
            "ancillary-after-idat": {b"gAMA", b"pHYs"},
            "iend-before-idat": {b"IEND"},
            "plte-after-idat": {b"PLTE"},
        }[variant]
        moved = [c for c in chunks if c.type in moved_types]
        rest = [c for c in chunks if c.type not in moved_types]
        if variant == "iend-before-idat":
            at = [c.type for c in rest].index(b"IDAT")
        else:  # right after the last IDAT
            at = len(rest) - 1 - [c.type for c in rest][::-1].index(b"IDAT") + 1
        rest[at:at] = moved
        return png_bytes(rest), variant
    if kind == "png-missing-iend":
        return png_bytes([c for c in chunks if c.type != b"IEND"]), "IEND dropped"
    if kind == "png-duplicate-ihdr":
        ihdr = chunks[0]
        if rng.random() < 0.5:
            chunks.insert(1, ihdr)
            return png_bytes(chunks), "identical IHDR repeated"
        width, height = struct.unpack(">II", ihdr.data[:8])
        other = struct.pack(">II", width // 2, height * 2) + ihdr.data[8:]
        chunks.insert(1, PngChunk.make(b"IHDR", other))
        return png_bytes(chunks), f"second IHDR claims {width // 2}x{height * 2}"
    raise ValueError(f"not a PNG damage: {kind}")


# --- JPEG --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JpegSegment:
    marker: int  # the byte after 0xFF
    start: int  # offset of the 0xFF
    end: int  # offset after the segment (not including the scan data after an SOS)


def jpeg_layout(data: bytes) -> tuple[list[JpegSegment], list[tuple[int, int]]]:
    """Marker segments and entropy-coded data ranges of a JPEG (no validation)."""
    segments: list[JpegSegment] = []
    scans: list[tuple[int, int]] = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            segments.append(JpegSegment(marker, pos, pos + 2))
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        segments.append(JpegSegment(marker, pos, end))
        pos = end
        if marker == 0xDA:  # entropy data up to the next marker other than RSTn
            scan_end = pos
            while True:
                scan_end = data.find(b"\xff", scan_end)
                if scan_end < 0 or scan_end + 1 >= len(data):
                    scan_end = len(data)
                    break
                following = data[scan_end + 1]
                if following != 0 and not 0xD0 <= following <= 0xD7:
                    break
                scan_end += 2
            scans.append((pos, scan_end))
            pos = scan_end
    return segments, scans


# Markers dropped into entropy data: restarts out of sequence, a second SOI, an early EOI,
# table and application markers with whatever follows as their length, a TEM.
BOGUS_MARKERS = (0xD0, 0xD3, 0xD7, 0xD8, 0xD9, 0xC4, 0xDB, 0xE1, 0xFE, 0x01)


def jpeg_damage(kind: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One of JPEG_DAMAGES on a clean JPEG; returns (bytes, detail)."""
    segments, scans = jpeg_layout(data)
    if kind == "jpeg-bogus-marker":
        out = bytearray(data)
        inserts = sorted(
            (_offset_in(scans, rng), BOGUS_MARKERS[int(rng.integers(len(BOGUS_MARKERS)))])
            for _ in range(int(rng.integers(1, 4)))
        )
        for offset, marker in reversed(inserts):  # from the end: earlier offsets stay valid
            out[offset:offset] = bytes((0xFF, marker))
        detail = ", ".join(f"FF{marker:02X} at {offset}" for offset, marker in inserts)
        return bytes(out), detail
    marker = 0xC4 if "dht" in kind else 0xDB
    name = "DHT" if marker == 0xC4 else "DQT"
    found = [s for s in segments if s.marker == marker]
    seg = found[int(rng.integers(len(found)))]
    if kind.startswith("jpeg-missing-"):
        if marker == 0xC4 and rng.random() < 0.5:
            first_sos = next(s.start for s in segments if s.marker == 0xDA)
            gone = [s for s in found if s.start < first_sos]
            kept = data
            for s in reversed(gone):
                kept = kept[: s.start] + kept[s.end :]
            return kept, f"all {len(gone)} DHT before the first scan removed"
        return data[: seg.start] + data[
            seg.end :
        ], f"{name} #{found.index(seg)} of {len(found)} removed"
    if kind.startswith("jpeg-duplicate-"):
        copy = data[seg.start : seg.end]
        return data[: seg.end] + copy + data[seg.end :], f"{name} #{found.index(seg)} repeated"
    raise ValueError(f"not a JPEG damage: {kind}")


# --- regions, for the bit flips ----------------------------------------------------------


def _tiff_regions(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    offsets: list[int] = []
    counts: list[int] = []
    for n in range(count):
        tag, kind, num, value = struct.unpack(
            endian + "HHII", data[ifd + 2 + 12 * n : ifd + 14 + 12 * n]
        )
        if tag in (273, 279):
            size = {3: 2, 4: 4}[kind]
            if num * size <= 4:
                raw = data[ifd + 10 + 12 * n : ifd + 10 + 12 * n + num * size]
            else:
                raw = data[value : value + num * size]
            values = list(struct.unpack(endian + ("H" if size == 2 else "I") * num, raw))
            (offsets if tag == 273 else counts).extend(values)
    strips = [(o, o + c) for o, c in zip(offsets, counts, strict=True)]
    return [(4, 8), (ifd, ifd + 2 + 12 * count + 4)], strips


def _gif_regions(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    flags = data[10]
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:  # image descriptor, local table, LZW code size, sub-blocks
            local = data[pos + 9]
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1
            start = pos
            while pos < len(data) and data[pos]:
                pos += data[pos] + 1
            return [(6, start)], [(start, pos)]
        else:
            break
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1
    return [(6, min(len(data), 13))], [(13, len(data))]


def _webp_regions(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pos = 12
    while pos + 8 <= len(data):
        chunk_type = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        if chunk_type in (b"VP8 ", b"VP8L"):
            # the chunk header and the frame header (VP8: tag, start code, dimensions)
            head_end = pos + 8 + 10
            return [(12, head_end)], [(head_end, pos + 8 + size)]
        pos += 8 + size + (size & 1)
    return [(12, 30)], [(30, len(data))]


def regions(base: str, data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(header ranges, data ranges) of a clean file: where the bit flips land. The header
    starts after the magic number (a flipped magic number is a non-image to everyone)."""
    fam = family(base)
    if fam == "jpeg":
        _, scans = jpeg_layout(data)
        first_scan = scans[0][0]
        return [(2, first_scan)], scans
    if fam == "png":
        chunks, pos, idat = png_chunks(data), len(PNG_SIGNATURE), []
        header_end = 0
        for chunk in chunks:
            if chunk.type == b"IDAT":
                header_end = header_end or pos + 8
                idat.append((pos + 8, pos + 8 + len(chunk.data)))
            pos += 12 + len(chunk.data)
        return [(len(PNG_SIGNATURE), header_end)], idat
    if fam == "webp":
        return _webp_regions(data)
    if fam == "gif":
        return _gif_regions(data)
    if fam == "bmp":
        (pixels,) = struct.unpack("<I", data[10:14])
        return [(2, pixels)], [(pixels, len(data))]
    if fam == "tiff":
        return _tiff_regions(data)
    raise ValueError(f"unknown base {base}")


def _offset_in(ranges: Sequence[tuple[int, int]], rng: np.random.Generator) -> int:
    """A uniform offset over the union of ranges."""
    sizes = np.asarray([max(0, end - start) for start, end in ranges], np.int64)
    pick = int(rng.integers(0, int(sizes.sum())))
    for (start, _), size in zip(ranges, sizes, strict=True):
        if pick < size:
            return start + pick
        pick -= int(size)
    raise AssertionError("unreachable")


def flip_bits(
    data: bytes, ranges: Sequence[tuple[int, int]], n: int, rng: np.random.Generator
) -> tuple[bytes, list[tuple[int, int]]]:
    """``n`` single-bit flips at distinct offsets inside ``ranges``: (bytes, [(offset, bit)])."""
    out = bytearray(data)
    flips: list[tuple[int, int]] = []
    used: set[int] = set()
    while len(flips) < n:
        offset = _offset_in(ranges, rng)
        if offset in used:
            continue
        used.add(offset)
        bit = int(rng.integers(8))
        out[offset] ^= 1 << bit
        flips.append((offset, bit))
    return bytes(out), sorted(flips)


def _refresh_png_crcs(data: bytes) -> bytes:
    return png_bytes([PngChunk.make(c.type, c.data) for c in png_chunks(data)])


# --- bombs -------------------------------------------------------------------------------


def _png_bomb_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB, followed by a few rows of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(bytes((1 + 3 * min(width, 4096)) * 4), 9)
    return png_bytes(
        [PngChunk.make(b"IHDR", ihdr), PngChunk.make(b"IDAT", rows), PngChunk.make(b"IEND", b"")]
    )


def _png_bomb_real(side: int) -> bytes:
    """A complete, valid 1-bit PNG of ``side`` x ``side`` zeros: ~100 KiB that inflates to
    side^2 / 8 bytes (a 10000 px side: 12.5 MB raw, 100 M pixels in a decoder's memory)."""
    row = bytes(1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    block = row * 500
    body = b"".join(compressor.compress(block) for _ in range(side // 500))
    body += compressor.compress(row * (side % 500)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return png_bytes(
        [PngChunk.make(b"IHDR", ihdr), PngChunk.make(b"IDAT", body), PngChunk.make(b"IEND", b"")]
    )


def _tiny(fmt: str, **params: Any) -> bytes:
    img = Image.new("RGB", (16, 16), (120, 130, 140))
    buf = io.BytesIO()
    (img.quantize(4) if fmt == "GIF" else img).save(buf, fmt, **params)
    return buf.getvalue()


def _gif_bomb(width: int, height: int, *, frame_only: bool) -> bytes:
    """A tiny GIF whose image descriptor (and, unless ``frame_only``, logical screen)
    claims ``width`` x ``height``."""
    out = bytearray(_tiny("GIF"))
    if not frame_only:
        out[6:10] = struct.pack("<HH", width, height)
    flags = out[10]
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    while out[pos] == 0x21:  # skip extensions to the image descriptor
        pos += 2
        while out[pos]:
            pos += out[pos] + 1
        pos += 1
    out[pos + 5 : pos + 9] = struct.pack("<HH", width, height)
    return bytes(out)


def _jpeg_bomb(width: int, height: int) -> bytes:
    data = bytearray(_tiny("JPEG", quality=90))
    segments, _ = jpeg_layout(bytes(data))
    sof = next(s for s in segments if s.marker in (0xC0, 0xC2))
    data[sof.start + 5 : sof.start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_bomb(width: int, height: int) -> bytes:
    data = bytearray(_tiny("WEBP", quality=80))
    assert data[12:16] == b"VP8 "
    data[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


def _tiff_bomb(width: int, height: int) -> bytes:
    data = bytearray(_tiny("TIFF"))
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for n in range(count):
        at = ifd + 2 + 12 * n
        tag, kind = struct.unpack("<HH", data[at : at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            fmt = "<H" if kind == 3 else "<I"
            data[at + 8 : at + 8 + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(data)


def _bmp_bomb(width: int, height: int) -> bytes:
    data = bytearray(_tiny("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def bombs(dims: Sequence[tuple[int, int]]) -> list[tuple[str, bytes, str]]:
    """(base, bytes, detail) of every bomb: each format's header claiming each of ``dims``,
    plus a real 1-bit PNG bomb, one just over the cap and one thin strip."""
    out: list[tuple[str, bytes, str]] = []
    for width, height in dims:
        claim = f"claims {width}x{height}"
        out.append(("png", _png_bomb_header_only(width, height), f"IHDR {claim}"))
        out.append(("gif", _gif_bomb(width, height, frame_only=False), f"screen+frame {claim}"))
        out.append(
            ("gif", _gif_bomb(width, height, frame_only=True), f"16x16 screen, frame {claim}")
        )
        out.append(("jpeg", _jpeg_bomb(width, height), f"SOF {claim}"))
        w, h = min(width, 16383), min(height, 16383)  # VP8's 14-bit dimensions
        out.append(("webp", _webp_bomb(w, h), f"VP8 claims {w}x{h}"))
        out.append(("tiff", _tiff_bomb(width, height), f"IFD {claim}"))
        out.append(("bmp", _bmp_bomb(width, height), f"BITMAPINFOHEADER {claim}"))
    out.append(("png", _png_bomb_real(10000), "complete 1-bit 10000x10000 of zeros"))
    out.append(
        ("png", _png_bomb_header_only(7100, 7100), "IHDR claims 7100x7100, just over the cap")
    )
    out.append(("png", _png_bomb_header_only(60000, 1000), "IHDR claims 60000x1000"))
    return out


# --- bodies that are not images ----------------------------------------------------------

HTML_BODIES = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p>"
    b"</body></html>\n",
    b'<html><head><title>Just a moment...</title><meta http-equiv="refresh" content="5">'
    b'</head><body><div id="challenge">Checking your browser before accessing.</div>'
    b"</body></html>",
    b"<!doctype html><html lang=en><meta charset=utf-8><title>502 Bad Gateway</title>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></html>\r\n",
)
TEXT_BODIES = (
    b'{"error":{"code":403,"message":"Signature expired"}}',
    b"Not Found",
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>",
)


# --- the corpus --------------------------------------------------------------------------


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


_DAMAGE_IDS = {kind: n for n, kind in enumerate(DAMAGE_KINDS)}


def build_corpus(seed: int = 0, spec: CorpusSpec = QUICK) -> list[CorruptFile]:
    """Every file of the corpus, clean controls first; the same for the same seed and spec."""
    files: list[CorruptFile] = []

    def add(
        base: str,
        damage: str,
        data: bytes,
        detail: str = "",
        *,
        parent: str | None = None,
        suffix: str | None = None,
        is_bomb: bool = False,
    ) -> None:
        suffix = suffix or SUFFIXES.get(family(base), "bin")
        name = f"{len(files):05d}_{base}_{damage}.{suffix}"
        files.append(CorruptFile(name, base, damage, is_bomb, data, detail, parent))

    for source in range(spec.sources):
        rng = _stream(seed, 0, source)
        width, height = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
        clean = encode_bases(photo(rng, width, height), source)
        for b, base in enumerate(BASES):
            data = clean[base]
            add(base, "clean", data, f"{width}x{height}")
            parent = files[-1].name

            def rng_for(
                damage: str, n: int = 0, *, _b: int = b, _s: int = source
            ) -> np.random.Generator:
                return _stream(seed, 1, _s, _b, _DAMAGE_IDS[damage], n)

            suffixes = sorted(set(SUFFIXES.values()) - {SUFFIXES[family(base)]})
            wrong = suffixes[int(rng_for("wrong-extension").integers(len(suffixes)))]
            add(base, "wrong-extension", data, f".{wrong}", parent=parent, suffix=wrong)
            for n in range(spec.truncations):
                # One cut per stratum of [1%, 99%]: every run covers the whole range.
                lo = 0.01 + 0.98 * n / spec.truncations
                fraction = lo + 0.98 / spec.truncations * float(rng_for("truncate", n).random())
                cut = min(len(data) - 1, max(1, round(len(data) * fraction)))
                add(
                    base,
                    "truncate",
                    data[:cut],
                    f"cut at {cut}/{len(data)} ({cut / len(data):.0%})",
                    parent=parent,
                )
            header, body = regions(base, data)
            for n in range(spec.header_flips):
                r = rng_for("bitflip-header", n)
                flipped, flips = flip_bits(data, header, int(r.integers(1, 3)), r)
                add(base, "bitflip-header", flipped, _flips(flips), parent=parent)
            for n in range(spec.data_flips):
                r = rng_for("bitflip-data", n)
                flipped, flips = flip_bits(data, body, int(r.integers(1, 5)), r)
                detail = _flips(flips)
                # Half the PNG flips with CRCs recomputed: the zlib stream's own damage
                # (a proxy that rewrote the file), not only the CRC check, is then tested.
                if family(base) == "png" and r.random() < 0.5:
                    flipped, detail = _refresh_png_crcs(flipped), detail + ", CRCs recomputed"
                add(base, "bitflip-data", flipped, detail, parent=parent)
            r = rng_for("zeroed-tail")
            keep = round(len(data) * float(r.uniform(0.3, 0.9)))
            add(
                base,
                "zeroed-tail",
                data[:keep] + bytes(len(data) - keep),
                f"zeros from {keep}/{len(data)}",
                parent=parent,
            )
            family_damages = {"png": PNG_DAMAGES, "jpeg": JPEG_DAMAGES}.get(family(base), ())
            for damage in family_damages:
                damage_fn = png_damage if family(base) == "png" else jpeg_damage
                damaged, detail = damage_fn(damage, data, rng_for(damage))
                add(base, damage, damaged, detail, parent=parent)

    r = _stream(seed, 2)
    image_suffixes = sorted(set(SUFFIXES.values()))
    add(TEXT_BASE, "zero-bytes", b"", "empty body", suffix="jpg")
    for n in range(2):
        size = int(r.integers(1000, 100_000))
        add(
            TEXT_BASE,
            "zero-filled",
            bytes(size),
            f"{size} zero bytes",
            suffix=image_suffixes[n % len(image_suffixes)],
        )
    for bodies, damage in ((HTML_BODIES, "html-body"), (TEXT_BODIES, "text-body")):
        for n, text in enumerate(bodies):
            add(
                TEXT_BASE,
                damage,
                text,
                text[:40].decode(errors="replace"),
                suffix=image_suffixes[(n + 2) % len(image_suffixes)],
            )
    for base, data, detail in bombs(spec.bomb_dims):
        add(base, "bomb", data, detail, is_bomb=True)
    return files


def _flips(flips: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"bit {bit} of byte {offset}" for offset, bit in flips)


# --- scoring -----------------------------------------------------------------------------

MAX_MISSES_LISTED = 20


def score(
    records: Sequence[CorruptFile],
    statuses: Mapping[str, Sequence[str]],
    *,
    max_misses: int = MAX_MISSES_LISTED,
) -> dict[str, Any]:
    """The figures from one status per contender per file (``statuses[c][i]`` is
    contender ``c`` on ``records[i]``).

    union: files (bombs excluded) that at least one decoder alone decoded; ``ratio``: the
    share of the union imgfleet decoded (0.0 for an empty union).
    """
    n = len(records)
    for contender in CONTENDERS:
        if len(statuses[contender]) != n:
            raise ValueError(f"{contender}: {len(statuses[contender])} statuses for {n} files")
        unknown = set(statuses[contender]) - set(STATUSES)
        if unknown:
            raise ValueError(f"{contender}: unknown statuses {sorted(unknown)}")
    counts = {c: {s: sum(1 for v in statuses[c] if v == s) for s in STATUSES} for c in CONTENDERS}
    decoded = {c: [v == DECODED for v in statuses[c]] for c in CONTENDERS}
    read_by = [[a for a in ALONE if decoded[a][i]] for i in range(n)]
    union = [i for i in range(n) if not records[i].is_bomb and read_by[i]]
    got = [i for i in union if decoded[IMGFLEET][i]]
    missed = [i for i in union if not decoded[IMGFLEET][i]]
    only = [
        i for i in range(n) if not records[i].is_bomb and decoded[IMGFLEET][i] and not read_by[i]
    ]
    bomb_at = [i for i in range(n) if records[i].is_bomb]
    in_union = set(union)
    by_damage: dict[str, dict[str, int]] = {}
    for kind in DAMAGE_KINDS:
        at = [i for i in range(n) if records[i].damage == kind]
        if not at:
            continue
        row = {"files": len(at), "union": sum(1 for i in at if i in in_union)}
        row.update({c: sum(1 for i in at if decoded[c][i]) for c in CONTENDERS})
        by_damage[kind] = row
    return {
        "files": n,
        "counts": counts,
        "union": len(union),
        "imgfleet_in_union": len(got),
        "ratio": round(len(got) / len(union), 4) if union else 0.0,
        "imgfleet_only": len(only),
        "imgfleet_only_by_damage": dict(Counter(records[i].damage for i in only)),
        "missed": len(missed),
        "missed_by_damage": dict(Counter(records[i].damage for i in missed)),
        "missed_files": [
            {
                "name": records[i].name,
                "base": records[i].base,
                "damage": records[i].damage,
                "detail": records[i].detail,
                "read_by": read_by[i],
                "imgfleet": statuses[IMGFLEET][i],
            }
            for i in missed[:max_misses]
        ],
        "bombs": len(bomb_at),
        "bombs_refused": sum(1 for i in bomb_at if statuses[IMGFLEET][i] == REFUSED),
        "by_damage": by_damage,
    }
