"""A synthetic product catalogue for demos, tests and benchmarks, generated deterministically.

Each item gets product-like images: a plain or gradient background with one or two textured
objects. Items differ in hue, shape, texture and layout on purpose, so that even a randomly
initialised CNN finds a resized, re-encoded copy of an image closest to its original: the
demo's near-duplicate check would mean nothing if unrelated items looked alike.

The format mix follows what catalogue CDNs serve (mostly baseline JPEG, some progressive
JPEG, PNG with alpha, WebP), plus the broken cases a worker must survive: a truncated JPEG,
a zero-byte file, an HTML error page saved as .jpg and a URL that answers 404. Every broken
kind is present at least once whenever ``n_items >= MIN_ITEMS_FOR_EVERY_KIND``.

The same ``(n_items, seed)`` always yields byte-identical files.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Kinds of image file in the corpus. The first four decode; the rest are broken on purpose.
GOOD_KINDS: tuple[str, ...] = ("jpeg", "progressive", "png", "webp")
BROKEN_KINDS: tuple[str, ...] = ("truncated", "empty", "html", "missing")
ALL_KINDS: tuple[str, ...] = GOOD_KINDS + BROKEN_KINDS

# The dead-letter reason the pipeline is expected to give each broken kind. A truncated
# JPEG may instead be recovered and indexed; callers treat "truncated" as either outcome.
EXPECTED_REASON_BY_KIND: dict[str, str] = {
    "truncated": "truncated",
    "empty": "empty",
    "html": "not_an_image",
    "missing": "http_404",
}

MIN_ITEMS_FOR_EVERY_KIND = 20
IMAGES_DIRNAME = "images"

# Share of primary items by kind; baseline JPEG takes whatever is left (about 70%).
_KIND_SHARE: dict[str, float] = {
    "progressive": 0.10,
    "png": 0.08,
    "webp": 0.06,
    "truncated": 0.015,
    "empty": 0.015,
    "html": 0.015,
    "missing": 0.015,
}
_SECOND_IMAGE_SHARE = 1 / 20
_NEAR_DUPLICATE_SHARE = 0.10

_SIDE_MIN_PX = 640
_SIDE_MAX_PX = 1600
_ASPECT_MIN = 0.6  # height / width
_ASPECT_MAX = 1.6
_JPEG_QUALITY = 88
_NEAR_DUP_SCALE_RANGE = (0.5, 0.8)
_NEAR_DUP_JPEG_QUALITY_RANGE = (65, 75)  # inclusive; "about 70"
_TRUNCATE_AT_FRACTION_RANGE = (0.55, 0.65)
# Golden-ratio steps spread consecutive items' hues as far apart as possible.
_GOLDEN_FRACTION = 0.6180339887498949
_SHAPES = ("ellipse", "rectangle", "rounded", "triangle", "polygon", "ring", "star")
_TEXTURES = ("solid", "stripes", "dots", "noise", "checker")
_EXTENSION_BY_KIND: dict[str, str] = {
    "jpeg": "jpg",
    "progressive": "jpg",
    "png": "png",
    "webp": "webp",
    "truncated": "jpg",
    "empty": "jpg",
    "html": "jpg",
    "missing": "jpg",
}
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><h1>502 Bad Gateway</h1><p>The origin did not answer in time.</p></body></html>\n"
)
_PLAN_STREAM = 0
_ITEM_STREAM = 1
_SECOND_STREAM = 2
_DUP_STREAM = 3


@dataclass(frozen=True)
class CorpusImage:
    image_key: str
    filename: str  # relative to the corpus's images directory
    kind: str  # one of ALL_KINDS


@dataclass(frozen=True)
class CorpusItem:
    item_id: str
    images: list[CorpusImage]


@dataclass
class Corpus:
    root: Path
    items: list[CorpusItem]
    near_duplicates: dict[str, str] = field(default_factory=dict)  # dup item id -> original

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIRNAME

    def path_of(self, image: CorpusImage) -> Path:
        return self.images_dir / image.filename

    def url_of(self, image: CorpusImage, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{IMAGES_DIRNAME}/{image.filename}"

    def kind_counts(self) -> dict[str, int]:
        return dict(Counter(image.kind for item in self.items for image in item.images))

    def expected_failures(self) -> dict[str, str]:
        """``"item_id/image_key"`` -> the reason code that image should be dead-lettered with.

        "truncated" means dead-lettered as truncated *or* recovered and indexed.
        """
        return {
            f"{item.item_id}/{image.image_key}": EXPECTED_REASON_BY_KIND[image.kind]
            for item in self.items
            for image in item.images
            if image.kind in EXPECTED_REASON_BY_KIND
        }

    def write_catalogue_jsonl(self, path: str | os.PathLike[str], base_url: str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for item_id, urls in self._rows(base_url):
                row = {"item_id": item_id, "image_urls": urls, "version": 1}
                fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        return path

    def write_catalogue_csv(self, path: str | os.PathLike[str], base_url: str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["item_id", "image_urls", "version"])
            for item_id, urls in self._rows(base_url):
                # "|" is the separator the catalogue reader splits CSV URL cells on.
                writer.writerow([item_id, "|".join(urls), 1])
        return path

    def _rows(self, base_url: str) -> Iterable[tuple[str, list[str]]]:
        for item in self.items:
            yield item.item_id, [self.url_of(image, base_url) for image in item.images]


@dataclass(frozen=True)
class _Planned:
    index: int
    item_id: str
    kind: str
    second_image: bool
    near_duplicate: bool


def make_corpus(root: str | os.PathLike[str], n_items: int, seed: int = 0) -> Corpus:
    """Generate ``n_items`` catalogue items (plus near-duplicate copies) under ``root/images``.

    Near-duplicates are extra items named ``dup-<original item id>``, so the corpus holds
    ``n_items + len(near_duplicates)`` items. ``seed`` must be non-negative.
    """
    if n_items < 0 or seed < 0:
        raise ValueError("n_items and seed must be non-negative")
    root = Path(root)
    images_dir = root / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(n_items, seed)
    # Pillow's encoders and resizes release the GIL, so threads use several cores without
    # the start-up cost of processes; each item has its own RNG, so order cannot matter.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        built = list(pool.map(lambda p: _build_item(p, seed, images_dir), plan))
    items = [item for item, _ in built]
    near_duplicates: dict[str, str] = {}
    for item, dup in built:
        if dup is not None:
            items.append(dup)
            near_duplicates[dup.item_id] = item.item_id
    return Corpus(root=root, items=items, near_duplicates=near_duplicates)


def _kind_counts(n_items: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, share in _KIND_SHARE.items():
        count = round(share * n_items)
        if n_items >= MIN_ITEMS_FOR_EVERY_KIND:
            count = max(1, count)
        counts[kind] = count
    counts["jpeg"] = max(0, n_items - sum(counts.values()))
    return counts


def _plan(n_items: int, seed: int) -> list[_Planned]:
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    kinds = [kind for kind, count in sorted(_kind_counts(n_items).items()) for _ in range(count)]
    kinds = kinds[:n_items]
    rng.shuffle(kinds)  # type: ignore[arg-type]
    good = [i for i, kind in enumerate(kinds) if kind in GOOD_KINDS]
    minimum = 1 if n_items >= MIN_ITEMS_FOR_EVERY_KIND else 0
    n_second = min(len(good), max(minimum, round(_SECOND_IMAGE_SHARE * n_items)))
    n_dups = min(len(good), max(minimum, round(_NEAR_DUPLICATE_SHARE * len(good))))
    second = set(rng.choice(good, size=n_second, replace=False).tolist()) if good else set()
    dups = set(rng.choice(good, size=n_dups, replace=False).tolist()) if good else set()
    return [
        _Planned(i, f"sku-{i:05d}", kind, i in second, i in dups) for i, kind in enumerate(kinds)
    ]


def _build_item(
    plan: _Planned, seed: int, images_dir: Path
) -> tuple[CorpusItem, CorpusItem | None]:
    rng = np.random.default_rng([seed, _ITEM_STREAM, plan.index])
    # A per-item base hue with a random offset per seed keeps neighbours apart in colour.
    hue = (plan.index * _GOLDEN_FRACTION + seed * 0.137) % 1.0
    images = [_write_primary(plan, rng, hue, images_dir)]
    primary_image: Image.Image | None = images[0][1]
    if plan.second_image:
        second_rng = np.random.default_rng([seed, _SECOND_STREAM, plan.index])
        view = _render(second_rng, hue, alpha=False)
        filename = f"{plan.item_id}-1.jpg"
        _write(images_dir / filename, _encode(view, "jpeg"))
        images.append((CorpusImage("1", filename, "jpeg"), None))
    item = CorpusItem(plan.item_id, [image for image, _ in images])
    dup = None
    if plan.near_duplicate and primary_image is not None:
        dup_rng = np.random.default_rng([seed, _DUP_STREAM, plan.index])
        dup = _write_near_duplicate(plan.item_id, primary_image, dup_rng, images_dir)
    return item, dup


def _write_primary(
    plan: _Planned, rng: np.random.Generator, hue: float, images_dir: Path
) -> tuple[CorpusImage, Image.Image | None]:
    filename = f"{plan.item_id}-0.{_EXTENSION_BY_KIND[plan.kind]}"
    image = CorpusImage("0", filename, plan.kind)
    path = images_dir / filename
    if plan.kind == "missing":
        path.unlink(missing_ok=True)  # a stale file from an earlier run would answer 200
        return image, None
    if plan.kind == "empty":
        _write(path, b"")
        return image, None
    if plan.kind == "html":
        _write(path, _HTML_PAGE)
        return image, None
    rendered = _render(rng, hue, alpha=plan.kind == "png")
    if plan.kind == "truncated":
        data = _encode(rendered, "jpeg")
        cut_fraction = rng.uniform(*_TRUNCATE_AT_FRACTION_RANGE)
        _write(path, data[: int(len(data) * cut_fraction)])
        return image, None
    _write(path, _encode(rendered, plan.kind))
    return image, rendered


def _write_near_duplicate(
    original_id: str, original: Image.Image, rng: np.random.Generator, images_dir: Path
) -> CorpusItem:
    if original.mode == "RGBA":
        # Composite on white, as the pipeline's preprocessing does with alpha.
        background = Image.new("RGBA", original.size, (255, 255, 255, 255))
        original = Image.alpha_composite(background, original)
    scale = rng.uniform(*_NEAR_DUP_SCALE_RANGE)
    size = (max(1, round(original.width * scale)), max(1, round(original.height * scale)))
    copy = original.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    low, high = _NEAR_DUP_JPEG_QUALITY_RANGE
    quality = int(rng.integers(low, high + 1))
    dup_id = f"dup-{original_id}"
    filename = f"{dup_id}-0.jpg"
    buf = io.BytesIO()
    copy.save(buf, format="JPEG", quality=quality)
    _write(images_dir / filename, buf.getvalue())
    return CorpusItem(dup_id, [CorpusImage("0", filename, "jpeg")])


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _encode(img: Image.Image, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "jpeg":
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    elif kind == "progressive":
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY, progressive=True, optimize=True)
    elif kind == "png":
        # Fastest zlib level: generation speed matters more than file size here.
        img.save(buf, format="PNG", compress_level=1)
    elif kind == "webp":
        img.save(buf, format="WEBP", quality=80, method=0)
    else:
        raise ValueError(f"no encoder for kind {kind!r}")
    return buf.getvalue()


# --- rendering -----------------------------------------------------------------------------


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    width_px = int(rng.integers(_SIDE_MIN_PX, _SIDE_MAX_PX + 1))
    aspect = rng.uniform(_ASPECT_MIN, _ASPECT_MAX)
    height_px = int(np.clip(round(width_px * aspect), _SIDE_MIN_PX, _SIDE_MAX_PX))
    return width_px, height_px


def _render(rng: np.random.Generator, hue: float, alpha: bool) -> Image.Image:
    """One product shot: background, then one or two textured objects in the item's hues."""
    size = _canvas_size(rng)
    canvas = Image.new("RGBA", size, (255, 255, 255, 0)) if alpha else _background(rng, size)
    n_objects = 1 if rng.random() < 0.6 else 2
    for n in range(n_objects):
        # The second object takes a complementary-ish hue so two-object items differ more.
        object_hue = hue + (0.0 if n == 0 else rng.uniform(0.25, 0.75))
        _draw_object(canvas, rng, object_hue, scale=1.0 if n == 0 else 0.6)
    return canvas


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    bg_hue = rng.random()
    saturation = rng.uniform(0.0, 0.45)
    first = _hsv_to_rgb(bg_hue, saturation, rng.uniform(0.35, 1.0))
    if rng.random() < 0.4:
        return Image.new("RGB", size, first)
    second = _hsv_to_rgb(bg_hue + rng.uniform(-0.2, 0.2), saturation, rng.uniform(0.2, 1.0))
    # A tiny gradient resized up is much cheaper than computing one at full resolution.
    steps = 32
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    direction = int(rng.integers(0, 3))
    weight: np.ndarray
    if direction == 0:
        weight = np.broadcast_to(t[None, :], (steps, steps))
    elif direction == 1:
        weight = np.broadcast_to(t[:, None], (steps, steps))
    else:
        weight = (t[None, :] + t[:, None]) / 2
    colours = (
        np.asarray(first, np.float32) * (1 - weight[..., None])
        + np.asarray(second, np.float32) * weight[..., None]
    )
    small = Image.fromarray(colours.round().astype(np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BILINEAR)


def _draw_object(canvas: Image.Image, rng: np.random.Generator, hue: float, scale: float) -> None:
    width_px, height_px = canvas.size
    short_px = min(width_px, height_px)
    obj_w = max(16, int(short_px * rng.uniform(0.35, 0.75) * scale))
    obj_h = max(16, int(obj_w * rng.uniform(0.6, 1.5)))
    obj_h = min(obj_h, height_px - 2)
    obj_w = min(obj_w, width_px - 2)
    left = int(rng.integers(0, width_px - obj_w))
    top = int(rng.integers(0, height_px - obj_h))
    mask = Image.new("L", (obj_w, obj_h), 0)
    _draw_shape(ImageDraw.Draw(mask), rng, obj_w, obj_h)
    texture = _texture(rng, hue, obj_w, obj_h)
    if canvas.mode == "RGBA":
        texture = texture.convert("RGBA")
    canvas.paste(texture, (left, top), mask)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> None:
    shape = _SHAPES[int(rng.integers(0, len(_SHAPES)))]
    box = (0, 0, w - 1, h - 1)
    if shape == "ellipse":
        draw.ellipse(box, fill=255)
    elif shape == "rectangle":
        draw.rectangle(box, fill=255)
    elif shape == "rounded":
        draw.rounded_rectangle(box, radius=int(min(w, h) * rng.uniform(0.1, 0.35)), fill=255)
    elif shape == "triangle":
        apex_x = int(w * rng.uniform(0.2, 0.8))
        draw.polygon([(apex_x, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inset = rng.uniform(0.22, 0.35)
        draw.ellipse((w * inset, h * inset, w * (1 - inset), h * (1 - inset)), fill=0)
    else:
        corners = int(rng.integers(5, 9))
        inner = rng.uniform(0.4, 0.6) if shape == "star" else 1.0
        points = 2 * corners if shape == "star" else corners
        turn = rng.uniform(0, 2 * math.pi)
        poly = []
        for k in range(points):
            radius = 1.0 if (shape != "star" or k % 2 == 0) else inner
            angle = turn + 2 * math.pi * k / points
            poly.append(
                (
                    (0.5 + 0.5 * radius * math.cos(angle)) * (w - 1),
                    (0.5 + 0.5 * radius * math.sin(angle)) * (h - 1),
                )
            )
        draw.polygon(poly, fill=255)


def _texture(rng: np.random.Generator, hue: float, w: int, h: int) -> Image.Image:
    """The object's surface: solid, stripes, dots, noise or checker in two of its hues."""
    base = np.asarray(_hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)), np.float32)
    accent = np.asarray(
        _hsv_to_rgb(hue + rng.uniform(-0.12, 0.12), rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.95)),
        np.float32,
    )
    texture = _TEXTURES[int(rng.integers(0, len(_TEXTURES)))]
    if texture == "solid":
        return Image.new("RGB", (w, h), tuple(int(c) for c in base))
    if texture == "noise":
        # Low-resolution noise upsampled reads as a fabric or stone surface, and costs less.
        cell_px = int(rng.integers(4, 24))
        small_h, small_w = max(2, h // cell_px), max(2, w // cell_px)
        weight = rng.random((small_h, small_w, 1), dtype=np.float32)
        small = base * (1 - weight) + accent * weight
        return Image.fromarray(small.round().astype(np.uint8), "RGB").resize(
            (w, h), Image.Resampling.BILINEAR
        )
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    period_px = float(rng.uniform(12, 80))
    if texture == "stripes":
        angle = rng.uniform(0, math.pi)
        projected = xx * math.cos(angle) + yy * math.sin(angle)
        on = (projected // (period_px / 2)) % 2 == 0
    elif texture == "dots":
        radius_px = period_px * rng.uniform(0.15, 0.4)
        dx = xx % period_px - period_px / 2
        dy = yy % period_px - period_px / 2
        on = dx * dx + dy * dy <= radius_px * radius_px
    else:  # checker
        on = ((xx // period_px) + (yy // period_px)) % 2 == 0
    pixels = np.where(on[..., None], base, accent).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
