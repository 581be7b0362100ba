"""The one preprocessing definition: every decode path (CPU, GPU, training) must match it.

A model says how it wants its pixels (``Preprocess``, carried by its model card and derived
from the model library's own transform config). For an image of any mode and size:

1. apply the EXIF orientation;
2. convert to 8-bit sRGB: an embedded ICC profile (Adobe RGB, Display P3, CMYK with its
   profile, ...) is converted to sRGB with littlecms (perceptual intent), so a wide-gamut
   or CMYK product photo lands where its sRGB twin does; alpha (and PNG/GIF transparency)
   is composited on white, 16-bit samples keep their high byte (``v >> 8``), CMYK /
   greyscale / palette without a profile go through Pillow;
3. resize with Pillow's ``BILINEAR`` or ``BICUBIC`` filter. Pillow widens the filter by the
   scale factor when shrinking, so this is an antialiased resize (what ``torchvision``
   calls ``antialias=True``), which the GPU path reproduces. No ``reducing_gap``: that
   would trade exactness for speed. The geometry is ``Preprocess.resize``:

   - ``crop``: the shorter side to ``floor(size / crop_pct)`` (the longer side
     ``int(scale * long / short)``, as torchvision computes it), then a centred
     ``size`` x ``size`` crop at offset ``round((side - size) / 2)`` (timm's and
     open_clip's eval transform) or ``floor`` of it (``crop_offset``; Hugging Face's
     shortest-edge + centre-crop);
   - ``squash``: both sides to ``size``, aspect ratio not kept (Hugging Face ViT / DINO
     processors that resize to a fixed height and width);
   - ``pad``: the longer side to ``size`` (the shorter ``round(size * short / long)``),
     centred on a ``size`` x ``size`` canvas of ``fill`` (white: catalogue backgrounds),
     so nothing of the product is cut off.

The result is RGB uint8, HWC, C-contiguous, ``size`` x ``size``.

``plan`` is the geometry as plain numbers, so the CPU and GPU paths compute it once, the
same way.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps

from workers.decode.types import (
    DEFAULT_PREPROCESS,
    INPUT_SIZE,
    INTERPOLATIONS,
    RESIZE_MODES,
    Interpolation,
    Preprocess,
    Resize,
)

__all__ = [
    "DEFAULT_PREPROCESS",
    "INPUT_SIZE",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "Geometry",
    "Interpolation",
    "Preprocess",
    "Resize",
    "converted_profile",
    "plan",
    "reference_preprocess",
    "resize_and_crop",
    "resized_shape",
    "to_rgb",
    "to_srgb",
]

_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_WHITE_RGBA = (255, 255, 255, 255)
# Modes whose samples are wider than 8 bits; Pillow's convert("RGB") clips them instead of
# scaling, which turns almost every 16-bit greyscale image white.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class Geometry:
    """Resize to ``resized`` (height, width), then take the ``size`` x ``size`` window at
    ``offset`` (top, left); a negative offset places the resized image on a canvas."""

    resized: tuple[int, int]
    offset: tuple[int, int]
    size: int

    @property
    def pads(self) -> bool:
        return self.offset[0] < 0 or self.offset[1] < 0


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``size``."""
    if height <= width:
        return size, max(size, int(size * width / height))
    return max(size, int(size * height / width)), size


def plan(height: int, width: int, spec: Preprocess) -> Geometry:
    """The geometry ``spec`` gives an image of ``height`` x ``width`` (after EXIF rotation)."""
    size = spec.size
    if spec.resize == "squash":
        return Geometry((size, size), (0, 0), size)
    if spec.resize == "pad":
        if height >= width:
            new_h, new_w = size, max(1, round(size * width / height))
        else:
            new_h, new_w = max(1, round(size * height / width)), size
        return Geometry((new_h, new_w), (-((size - new_h) // 2), -((size - new_w) // 2)), size)
    new_h, new_w = resized_shape(height, width, spec.scale_size)
    if spec.crop_offset == "floor":
        return Geometry((new_h, new_w), ((new_h - size) // 2, (new_w - size) // 2), size)
    offset = (round((new_h - size) / 2.0), round((new_w - size) / 2.0))
    return Geometry((new_h, new_w), offset, size)


# Modes littlecms converts from, with the colour part of each: alpha is split off first.
_ICC_MODES = {"RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK", "L": "L", "LA": "L"}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=32)
def _profile(icc: bytes) -> tuple[ImageCms.ImageCmsProfile | None, str]:
    """The profile and its description; (None, "") when littlecms cannot read it."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return profile, ImageCms.getProfileDescription(profile).strip()
    except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
        return None, ""


def converted_profile(icc: bytes | None) -> str:
    """The description of a profile decode converts to sRGB; "" for none, for sRGB itself
    and for one littlecms cannot read (those pixels are taken as sRGB)."""
    if not icc:
        return ""
    profile, description = _profile(bytes(icc))
    if profile is None or "srgb" in description.lower():
        return ""
    return description or "unnamed profile"


@functools.lru_cache(maxsize=32)
def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached littlecms transform from ``icc`` to sRGB; None when ``converted_profile``
    says there is nothing to convert."""
    profile, _ = _profile(icc)
    if profile is None or not converted_profile(icc):
        return None
    try:
        return ImageCms.buildTransform(
            profile, _SRGB, mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
        )
    except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
        return None


def to_srgb(img: Image.Image) -> Image.Image:
    """``img`` with its embedded ICC profile converted to sRGB (alpha kept); unchanged
    without a profile, with an sRGB one, or in a mode littlecms does not take."""
    icc = img.info.get("icc_profile")
    colour_mode = _ICC_MODES.get(img.mode)
    if not icc or colour_mode is None:
        return img
    transform = _to_srgb_transform(bytes(icc), colour_mode)
    if transform is None:
        return img
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
    colour = img.convert(colour_mode) if alpha is not None else img
    converted = ImageCms.applyTransform(colour, transform)
    assert converted is not None  # applyTransform returns None only with inPlace=True
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit sRGB, alpha composited on white."""
    if img.mode == "P" and img.info.get("icc_profile"):
        # Palette entries are in the profile's space: expand them, then convert.
        icc = img.info["icc_profile"]
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        img.info["icc_profile"] = icc
    img = to_srgb(img)
    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img).astype(np.int64)
        grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        img = Image.fromarray(grey)
    elif img.mode == "F":
        # Float images carry no agreed range; clipping to 0..255 is Pillow's own choice.
        img = img.convert("L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE_RGBA)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def resize_and_crop(rgb: np.ndarray, spec: Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """The geometry of ``spec`` on an RGB uint8 HWC array; RGB uint8 HWC out."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    geometry = plan(height, width, spec)
    new_height, new_width = geometry.resized
    img = Image.fromarray(rgb)
    if (new_height, new_width) != (height, width):
        img = img.resize((new_width, new_height), _PIL_FILTERS[spec.interpolation])
    top, left = geometry.offset
    if geometry.pads:
        canvas = Image.new("RGB", (spec.size, spec.size), spec.fill)
        canvas.paste(img, (-left, -top))
        img = canvas
    else:
        img = img.crop((left, top, left + spec.size, top + spec.size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def reference_preprocess(img: Image.Image, spec: Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """Slow, obviously correct reference: full-size decode, then the definition above.

    Fast paths are tested against this; it never uses draft / shrink-on-load.
    """
    img.load()
    oriented = ImageOps.exif_transpose(img)
    rgb = to_rgb(oriented)
    return resize_and_crop(np.asarray(rgb, dtype=np.uint8), spec)
