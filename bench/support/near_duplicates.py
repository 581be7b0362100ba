"""The near-duplicate set of ``bench/quality.py``: the real photographs, the catalogue edits,
the queries, and the top-1 / recall@k scoring.

Imports numpy and Pillow only (scikit-image and scikit-learn inside ``load_originals``), and
nothing of the project, so a unit test can check every piece without a model.

Originals (``CANDIDATES``; scikit-image 0.26 and scikit-learn's bundled samples):

| name                 | source  | used | why not                                                  |
|----------------------|---------|------|----------------------------------------------------------|
| astronaut            | skimage | yes  |                                                          |
| brick                | skimage | yes  | (grey texture photograph)                                |
| camera               | skimage | yes  | (grey)                                                   |
| chelsea              | skimage | yes  |                                                          |
| clock                | skimage | yes  | (grey, motion-blurred photograph)                        |
| coffee               | skimage | yes  |                                                          |
| coins                | skimage | yes  | (grey)                                                   |
| grass                | skimage | yes  | (grey texture photograph)                                |
| gravel               | skimage | yes  | (grey texture photograph)                                |
| hubble_deep_field    | skimage | yes  |                                                          |
| immunohistochemistry | skimage | yes  |                                                          |
| moon                 | skimage | yes  | (grey)                                                   |
| motorcycle_left      | skimage | yes  | ``stereo_motorcycle()[0]``                               |
| page                 | skimage | yes  | (grey photograph of a book page)                         |
| retina               | skimage | yes  |                                                          |
| rocket               | skimage | yes  |                                                          |
| text                 | skimage | yes  | (grey photograph of text)                                |
| china                | sklearn | yes  |                                                          |
| flower               | sklearn | yes  |                                                          |
| cat                  | skimage | no   | the same pixels as chelsea                               |
| motorcycle_right     | skimage | no   | the other view of motorcycle_left: a true near-duplicate |
| cell                 | skimage | no   | a phase image reconstructed from a hologram, not a photo |
| microaneurysms       | skimage | no   | 102x102 px: smaller than any catalogue image             |
| eagle, skin          | skimage | no   | downloaded on first use (pooch): not offline, and a set  |
|                      |         |      | that depends on the network would not compare across runs|
| lily, kidney, cells3d| skimage | no   | downloaded, and multi-channel fluorescence, not RGB      |
| colorwheel, logo,    | skimage | no   | synthetic                                                |
| checkerboard, horse, |         |      |                                                          |
| binary_blobs,        |         |      |                                                          |
| shepp_logan_phantom  |         |      |                                                          |

Grey photographs are converted to RGB (three equal channels), as a catalogue would serve them.

Edits (``EDITS``): each step is a pure function of a PIL image and a seeded
``numpy.random.Generator``; an edit is one to three steps applied in order with one generator,
which ``query_rng`` seeds from (seed, original name, edit name).
"""

from __future__ import annotations

import colorsys
import io
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

__all__ = [
    "CANDIDATES",
    "EDITS",
    "Candidate",
    "Edit",
    "Original",
    "Query",
    "build_queries",
    "corner_window",
    "encode_jpeg",
    "figures_by_group",
    "load_originals",
    "query_rng",
    "retrieval_figures",
    "target_ranks",
]

EditStep = Callable[[Image.Image, np.random.Generator], Image.Image]

WHITE = (255, 255, 255)
QUERY_JPEG_QUALITY = 90  # what a CDN serves
ORIGINAL_JPEG_QUALITY = 95  # the catalogue's master copy
RECOMPRESS_JPEG_QUALITY = 70
CENTRE_CROP_AREA = 0.70
CORNER_CROP_AREA = 0.50
# How far from its corner the off-centre window may sit, as a share of the free room: 0 is
# flush in the corner, 1 would be the opposite corner. Up to a quarter keeps it corner-ish.
CORNER_SLACK_SHARE = 0.25
PAD_MARGIN_RANGE = (0.05, 0.15)  # white margin each side, share of the long side
JITTER_RANGE = (0.15, 0.30)  # |factor - 1| for brightness, contrast and saturation
ROTATE_DEGREES_RANGE = (5.0, 10.0)  # either direction
CAPTION_HEIGHT_RANGE = (0.12, 0.20)  # strip height, share of the image height
WATERMARK_OPACITY_RANGE = (80, 130)  # alpha of the text out of 255: 31-51%
WATERMARK_TEXTS = ("© shop.example", "SAMPLE", "© 2026 Example Store", "imgfleet-demo")
CAPTION_TEXTS = (
    "NEW SEASON · 30% OFF",
    "Free delivery over $50",
    "Only 3 left in stock!",
    "BEST SELLER · 4.8/5 (2,311)",
)
BADGE_TEXTS = ("SALE", "NEW", "-30%", "HOT")


# --- originals -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    name: str
    source: str  # "skimage" or "sklearn"
    dropped: str = ""  # why it is not used; "" when it is


CANDIDATES: tuple[Candidate, ...] = (
    *(
        Candidate(name, "skimage")
        for name in (
            "astronaut",
            "brick",
            "camera",
            "chelsea",
            "clock",
            "coffee",
            "coins",
            "grass",
            "gravel",
            "hubble_deep_field",
            "immunohistochemistry",
            "moon",
            "motorcycle_left",
            "page",
            "retina",
            "rocket",
            "text",
        )
    ),
    Candidate("china", "sklearn"),
    Candidate("flower", "sklearn"),
    Candidate("cat", "skimage", "the same pixels as chelsea"),
    Candidate("motorcycle_right", "skimage", "the other view of motorcycle_left: a true match"),
    Candidate("cell", "skimage", "phase image reconstructed from a hologram, not a photo"),
    Candidate("microaneurysms", "skimage", "102x102 px: smaller than any catalogue image"),
    Candidate("eagle", "skimage", "downloaded on first use: the set must not need a network"),
    Candidate("skin", "skimage", "downloaded on first use: the set must not need a network"),
    Candidate("lily", "skimage", "downloaded; four-channel fluorescence, not RGB"),
    Candidate("kidney", "skimage", "downloaded; 3-D fluorescence, not RGB"),
    Candidate("cells3d", "skimage", "downloaded; 3-D fluorescence, not RGB"),
    *(
        Candidate(name, "skimage", "synthetic")
        for name in (
            "colorwheel",
            "logo",
            "checkerboard",
            "horse",
            "binary_blobs",
            "shepp_logan_phantom",
        )
    ),
)

MIN_ORIGINALS = 12


@dataclass(frozen=True)
class Original:
    name: str
    source: str
    image: Image.Image  # RGB


def _pixels(candidate: Candidate) -> np.ndarray:
    if candidate.source == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{candidate.name}.jpg"))
    from skimage import data

    if candidate.name == "motorcycle_left":
        return np.asarray(data.stereo_motorcycle()[0])
    return np.asarray(getattr(data, candidate.name)())


def load_originals(min_count: int = MIN_ORIGINALS) -> tuple[list[Original], dict[str, str]]:
    """The used candidates that load offline, as RGB images, and {name: error} of the rest."""
    originals: list[Original] = []
    skipped: dict[str, str] = {}
    for candidate in CANDIDATES:
        if candidate.dropped:
            continue
        try:
            pixels = _pixels(candidate)
            if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
                raise ValueError(f"not an 8-bit picture: {pixels.dtype} {pixels.shape}")
            image = Image.fromarray(pixels).convert("RGB")
        except Exception as exc:  # an older or newer package, a missing file: skip it
            skipped[candidate.name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            continue
        originals.append(Original(candidate.name, candidate.source, image))
    if len(originals) < min_count:
        raise RuntimeError(f"only {len(originals)} originals load (need {min_count}): {skipped}")
    return originals, skipped


def encode_jpeg(image: Image.Image, quality: int = QUERY_JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --- edit steps ------------------------------------------------------------------------------


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font at any size (it needs FreeType; without it, the fixed bitmap font).
    return ImageFont.load_default(size=max(8, px))


def recompress_half(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Half the size (Lanczos), saved as JPEG quality 70 and read back."""
    del rng
    size = (max(1, round(image.width / 2)), max(1, round(image.height / 2)))
    small = image.resize(size, Image.Resampling.LANCZOS)
    return Image.open(io.BytesIO(encode_jpeg(small, RECOMPRESS_JPEG_QUALITY))).convert("RGB")


def _window(size: tuple[int, int], area: float) -> tuple[int, int]:
    side = math.sqrt(area)
    return max(1, round(size[0] * side)), max(1, round(size[1] * side))


def crop_centre(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The central window with 70% of the area (the aspect ratio kept)."""
    del rng
    w, h = _window(image.size, CENTRE_CROP_AREA)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def corner_window(size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box with half the area near a random corner: (left, top, right, bottom)."""
    w, h = _window(size, CORNER_CROP_AREA)
    free_x, free_y = size[0] - w, size[1] - h
    off_x = round(free_x * rng.uniform(0, CORNER_SLACK_SHARE))
    off_y = round(free_y * rng.uniform(0, CORNER_SLACK_SHARE))
    right_side, bottom_side = bool(rng.integers(2)), bool(rng.integers(2))
    left = free_x - off_x if right_side else off_x
    top = free_y - off_y if bottom_side else off_y
    return left, top, left + w, top + h


def crop_corner(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Half the area, in a window near a corner: a detail shot or a bad auto-crop."""
    return image.crop(corner_window(image.size, rng))


def flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    del rng
    return ImageOps.mirror(image)


def pad_square(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Centred on a white square with a 5-15% margin: the marketplace listing format."""
    long_side = max(image.size)
    margin = round(long_side * rng.uniform(*PAD_MARGIN_RANGE))
    side = long_side + 2 * margin
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Semi-transparent text tiled diagonally over the whole picture."""
    w, h = image.size
    font_px = max(10, round(min(w, h) / rng.uniform(9.0, 13.0)))
    font = _font(font_px)
    text = WATERMARK_TEXTS[int(rng.integers(len(WATERMARK_TEXTS)))]
    colour = WHITE if rng.random() < 0.7 else (0, 0, 0)
    opacity = int(rng.integers(WATERMARK_OPACITY_RANGE[0], WATERMARK_OPACITY_RANGE[1] + 1))
    side = math.ceil(math.hypot(w, h)) + 2 * font_px
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    step_x = math.ceil(right - left) + 2 * font_px
    step_y = max(1, math.ceil(bottom - top) * 3)
    for row, y in enumerate(range(0, side, step_y)):
        for x in range(-step_x + (row % 2) * step_x // 2, side, step_x):
            draw.text((x, y), text, font=font, fill=(*colour, opacity))
    angle = float(rng.uniform(20.0, 40.0)) * (1 if rng.random() < 0.5 else -1)
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC)
    x0, y0 = (side - w) // 2, (side - h) // 2
    layer = layer.crop((x0, y0, x0 + w, y0 + h))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def logo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A shop badge (coloured disc or tag with a word) in a corner, mostly opaque."""
    w, h = image.size
    size = max(12, round(min(w, h) * rng.uniform(0.18, 0.26)))
    margin = round(min(w, h) * 0.03)
    r, g, b = colorsys.hsv_to_rgb(float(rng.uniform(0, 1)), 0.85, 0.85)
    fill = (round(r * 255), round(g * 255), round(b * 255))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    x0 = margin if rng.random() < 0.5 else w - margin - size
    y0 = margin if rng.random() < 0.5 else h - margin - size
    alpha = int(rng.integers(190, 256))
    box = (x0, y0, x0 + size, y0 + size)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=(*fill, alpha))
    else:
        draw.rounded_rectangle(box, radius=size // 5, fill=(*fill, alpha))
    text = BADGE_TEXTS[int(rng.integers(len(BADGE_TEXTS)))]
    font = _font(size // 4)
    draw.text(
        (x0 + size / 2, y0 + size / 2), text, font=font, fill=(255, 255, 255, 255), anchor="mm"
    )
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def caption(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A text strip (12-20% of the height) added above or below the picture."""
    w, h = image.size
    strip = max(16, round(h * rng.uniform(*CAPTION_HEIGHT_RANGE)))
    backgrounds = (WHITE, (0, 0, 0), (200, 30, 45), (25, 60, 140))
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    ink = (0, 0, 0) if background == WHITE else WHITE
    canvas = Image.new("RGB", (w, h + strip), background)
    below = rng.random() < 0.5
    canvas.paste(image, (0, 0 if below else strip))
    draw = ImageDraw.Draw(canvas)
    text = CAPTION_TEXTS[int(rng.integers(len(CAPTION_TEXTS)))]
    y_mid = (h + strip / 2) if below else strip / 2
    draw.text((round(w * 0.03), y_mid), text, font=_font(strip // 2), fill=ink, anchor="lm")
    return canvas


def jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each moved 15-30% up or down."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        sign = 1 if rng.random() < 0.5 else -1
        image = enhancer(image).enhance(1.0 + sign * float(rng.uniform(*JITTER_RANGE)))
    return image


def _angle(rng: np.random.Generator) -> float:
    return float(rng.uniform(*ROTATE_DEGREES_RANGE)) * (1 if rng.random() < 0.5 else -1)


def rotate_fill(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """5-10° either way, the canvas grown to hold it, the corners white."""
    return image.rotate(
        _angle(rng), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=WHITE
    )


def rotate_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """5-10° either way, cut to the largest centred box of the same shape with no fill."""
    angle = _angle(rng)
    w, h = image.size
    a = math.radians(abs(angle))
    cos, sin = math.cos(a), math.sin(a)
    scale = min(w / (w * cos + h * sin), h / (w * sin + h * cos))
    cw, ch = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC)
    left, top = (w - cw) // 2, (h - ch) // 2
    return rotated.crop((left, top, left + cw, top + ch))


def grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    del rng
    return image.convert("L").convert("RGB")


# --- edits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    name: str
    steps: tuple[EditStep, ...]

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for step in self.steps:
            image = step(image, rng)
        return image.convert("RGB")


EDITS: tuple[Edit, ...] = (
    Edit("recompress_half_q70", (recompress_half,)),
    Edit("crop_centre_70", (crop_centre,)),
    Edit("crop_corner_50", (crop_corner,)),
    Edit("flip", (flip,)),
    Edit("pad_square", (pad_square,)),
    Edit("watermark", (watermark,)),
    Edit("logo", (logo,)),
    Edit("caption", (caption,)),
    Edit("jitter", (jitter,)),
    Edit("rotate_fill", (rotate_fill,)),
    Edit("rotate_crop", (rotate_crop,)),
    Edit("grayscale", (grayscale,)),
    Edit("crop_centre+flip", (crop_centre, flip)),
    Edit("crop_corner+recompress", (crop_corner, recompress_half)),
    Edit("pad+jitter+recompress", (pad_square, jitter, recompress_half)),
    Edit("rotate+caption+grayscale", (rotate_fill, caption, grayscale)),
    Edit("flip+watermark+jitter", (flip, watermark, jitter)),
)


@dataclass(frozen=True)
class Query:
    original: int  # index into the originals (= the database row of the right answer)
    edit: str
    seed: int
    data: bytes  # JPEG


def query_rng(seed: int, original: str, edit: str) -> np.random.Generator:
    """The generator for one query: the same (seed, original, edit) always edits alike, and
    adding an original or an edit changes no other query."""
    return np.random.default_rng([seed, zlib.crc32(original.encode()), zlib.crc32(edit.encode())])


def build_queries(
    originals: Sequence[Original],
    edits: Iterable[Edit] = EDITS,
    seeds: Iterable[int] = (0,),
    *,
    quality: int = QUERY_JPEG_QUALITY,
    workers: int = 1,
) -> list[Query]:
    """Every edit of every original under every seed, as JPEG bytes, in that nesting order."""
    plan = [(s, e, i) for s in seeds for e in edits for i in range(len(originals))]

    def one(job: tuple[int, Edit, int]) -> Query:
        seed, edit, index = job
        original = originals[index]
        edited = edit.apply(original.image, query_rng(seed, original.name, edit.name))
        return Query(index, edit.name, seed, encode_jpeg(edited, quality))

    if workers <= 1:
        return [one(job) for job in plan]
    # Pillow releases the GIL in resize, rotate and the JPEG codec: threads use the cores.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, plan))


# --- scoring ---------------------------------------------------------------------------------


def target_ranks(similarity: np.ndarray, targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """0-based rank of each query's right answer in its row of ``similarity`` [Q, D]: how many
    *other* database entries score at least as high. A tie counts against the answer: a
    64-bit hash often ties, and a coin toss would credit it with hits it did not make."""
    sim = np.asarray(similarity, dtype=np.float64)
    rows = np.asarray(targets, dtype=np.int64)
    if sim.ndim != 2 or rows.shape != (sim.shape[0],):
        raise ValueError(f"similarity {sim.shape} and targets {rows.shape} do not match")
    right = sim[np.arange(len(rows)), rows][:, None]
    return (sim >= right).sum(axis=1) - 1


def retrieval_figures(ranks: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top1`` (k = 1) and ``recall@k``: the share of queries whose answer ranks below k."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        key = "top1" if k == 1 else f"recall{k}"
        out[key] = float(np.mean(ranks < k)) if len(ranks) else float("nan")
    return out


def figures_by_group(
    ranks: np.ndarray, groups: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[str, dict[str, float]]:
    """``retrieval_figures`` per group (edit name), in first-seen order."""
    ranks = np.asarray(ranks)
    labels = np.asarray(groups)
    return {g: retrieval_figures(ranks[labels == g], ks) for g in dict.fromkeys(groups)}
