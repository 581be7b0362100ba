"""The odd-image corpus through the real worker over loopback HTTP.

Every case ends with the right outcome (indexed, recovered, or dead-lettered with its
reason) within a bounded run and bounded decode-process memory. The same corpus goes
through `imgfleet inspect` (in process) for the per-input report.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.brokers.base import DeadLetter
from common.brokers.local.broker import LocalBroker
from common.config import load_settings
from common.identity import image_id_for
from common.schema import Job
from common.storage.local import LocalStorage
from imgfleet.cli.inspect import inspect_inputs
from index.publish import build_generation
from index.search import Searcher
from tests.support import local_worker
from tests.support.faulty_image_server import FaultyImageServer
from tests.support.icc import DISPLAY_P3, rgb_profile

pytestmark = pytest.mark.integration

RUN_BOUND_S = 240  # a hang anywhere fails the test instead of the suite
CHILD_RSS_BOUND_KB = 1_500_000  # a 30000^2 PNG decoded would take 2.7 GB


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 37.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_header_only(side: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _bad_crc_text_chunk(png: bytes) -> bytes:
    body = b"tEXtComment\x00made by a broken encoder"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) ^ 1)
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def write_corpus(images: Path) -> dict[str, str | None]:
    """File name -> expected dead-letter reason (None: indexed)."""
    import pillow_heif

    pillow_heif.register_heif_opener()  # for writing the HEIC case here
    images.mkdir(parents=True)
    p = photo(900, 700)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (320, 240), c) for c in ("red", "lime")]
    rgba = np.dstack([np.asarray(p), np.full((700, 900), 120, np.uint8)])
    baseline = encode(p, "JPEG", quality=90)
    files: dict[str, tuple[bytes, str | None]] = {
        "baseline.jpg": (baseline, None),
        "progressive.jpg": (encode(p, "JPEG", progressive=True), None),
        "cmyk.jpg": (encode(p.convert("CMYK"), "JPEG"), None),
        "grey.jpg": (encode(p.convert("L"), "JPEG"), None),
        "exif-rotated.jpg": (encode(p, "JPEG", exif=exif.tobytes()), None),
        "palette.png": (encode(p.quantize(64), "PNG", transparency=0), None),
        "rgba.png": (encode(Image.fromarray(rgba), "PNG"), None),
        "grey16.png": (
            encode(Image.fromarray(np.asarray(p)[..., 0].astype(np.uint16) * 257), "PNG"),
            None,
        ),
        "animated.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), None),
        "animated.webp": (encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), None),
        "alpha.webp": (encode(Image.fromarray(rgba), "WEBP"), None),
        "truncated-mild.jpg": (baseline[: len(baseline) * 85 // 100], None),  # recovered
        "truncated-severe.jpg": (baseline[: len(baseline) * 15 // 100], "truncated"),
        "truncated.png": (encode(p, "PNG")[:20000], "truncated"),
        "zero.jpg": (b"", "empty"),
        "page.jpg": (b"<!DOCTYPE html><html><body>Not found</body></html>", "not_an_image"),
        "bomb-30000.png": (png_header_only(30_000), "too_many_pixels"),
        "bomb-8000.png": (png_header_only(8_000), "too_many_pixels"),
        "garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20, "undecodable"),
        "oversize.jpg": (b"\xff\xd8\xff\xe0" + bytes(9 * 2**20), "too_large"),
        "slow-drip.jpg": (baseline, "timeout"),
        # Colour, fallback decoding and the formats CDNs serve.
        "display-p3.jpg": (
            encode(p, "JPEG", icc_profile=rgb_profile("Display P3", DISPLAY_P3)),
            None,
        ),
        "bad-crc-text.png": (_bad_crc_text_chunk(encode(p, "PNG")), None),  # Pillow refuses it
        "photo.avif": (encode(p, "AVIF", quality=80), None),
        "photo.heic": (encode(p, "HEIF", quality=80), None),
        "photo.jxl": (b"\xff\x0a\xfa\x7f" + bytes(256), "unsupported_format"),
    }
    for name, (data, _) in files.items():
        (images / name).write_bytes(data)
    expected = {name: reason for name, (_, reason) in files.items()}
    # Served by fault hooks, not files.
    expected.update(
        {
            "gzip-bomb.jpg": "too_large",
            "loop.jpg": "http_4xx",
            "missing.jpg": "http_404",
            "to-metadata.jpg": "unsupported_url",
        }
    )
    return expected


def test_every_odd_image_ends_with_the_right_outcome(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "images")
    config = local_worker.sections(
        tmp_path,
        broker={"retry_max_s": 0.1, "max_attempts": 2},
        worker={
            "max_download_bytes": 8 * 2**20,
            "total_timeout_s": 2.0,
            "recovered_min_fraction": 0.5,
        },
    )
    settings = load_settings(**config)
    with FaultyImageServer(tmp_path) as server:
        server.drip("slow-drip.jpg", chunk_bytes=256, interval_s=0.1)
        server.gzip_bomb("gzip-bomb.jpg", inflated_bytes=1 << 30)
        server.redirect("loop.jpg", "/images/loop.jpg")
        server.redirect("to-metadata.jpg", "http://169.254.169.254/latest/meta-data/iam")
        urls = {name: f"{server.base_url}/images/{name}" for name in expected}
        jobs = [Job(item_id=name, url=url, run_id="odd") for name, url in urls.items()]

        async def publish() -> None:
            broker = LocalBroker(local_worker.queue_path(tmp_path))
            await broker.publish(jobs)
            await broker.close()

        async def outcome() -> list[DeadLetter]:
            broker = LocalBroker(local_worker.queue_path(tmp_path))
            dead = await broker.dead_letters(10**6)
            assert await broker.pending() == 0
            await broker.close()
            return dead

        asyncio.run(publish())
        # In a fresh interpreter: what its children's peak says is this run's alone.
        measured = local_worker.run_measured(config, worker_id="odd", timeout_s=RUN_BOUND_S)
        dead = asyncio.run(outcome())
        reports = asyncio.run(
            inspect_inputs(
                [
                    urls["truncated-mild.jpg"],
                    urls["cmyk.jpg"],
                    urls["page.jpg"],
                    urls["bomb-30000.png"],
                    urls["gzip-bomb.jpg"],
                    urls["display-p3.jpg"],
                    urls["bad-crc-text.png"],
                    urls["photo.jxl"],
                ],
                settings,
            )
        )

    got = {d.item_id: d.reason for d in dead}
    want = {name: reason for name, reason in expected.items() if reason is not None}
    assert got == want
    storage = LocalStorage(settings.storage.root)
    build_generation(storage, 2)
    indexed = {int(i) for i in Searcher(storage).image_ids()}
    for name, reason in expected.items():
        assert (image_id_for(name, "0") in indexed) == (reason is None), name
    assert measured["stats"]["recovered"] == 1
    # Decoders never held a bomb's pixels (the largest child process stayed small).
    assert 0 < measured["children_max_rss_kb"] < CHILD_RSS_BOUND_KB

    by_input = {r["input"].rsplit("/", 1)[1]: r for r in reports}
    assert by_input["truncated-mild.jpg"]["status"] == "recovered"
    assert by_input["truncated-mild.jpg"]["reason"] == "truncated"
    assert 0.5 < by_input["truncated-mild.jpg"]["decoded_fraction"] < 1.0
    assert (by_input["cmyk.jpg"]["status"], by_input["cmyk.jpg"]["format"]) == ("ok", "jpeg")
    assert (by_input["cmyk.jpg"]["width"], by_input["cmyk.jpg"]["height"]) == (900, 700)
    assert by_input["page.jpg"]["reason"] == "not_an_image"
    assert by_input["bomb-30000.png"]["reason"] == "too_many_pixels"
    assert by_input["gzip-bomb.jpg"]["reason"] == "too_large"
    assert by_input["display-p3.jpg"]["colour_from"] == "Display P3"
    assert by_input["bad-crc-text.png"]["path"].endswith("-fallback")
    assert by_input["photo.jxl"]["reason"] == "unsupported_format"
    for report in reports:
        assert report["total_ms"] is not None and {"input", "status", "format"} <= report.keys()
