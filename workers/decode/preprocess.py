"""The one preprocessing definition: every decode path (CPU, GPU, training) must match it.

Definition, for an image of any mode and size:

1. apply the EXIF orientation;
2. convert to 8-bit RGB: alpha (and PNG/GIF transparency) is composited on white, 16-bit
   samples keep their high byte (``v >> 8``), CMYK / greyscale / palette go through Pillow;
3. resize so the shorter side is ``size`` with Pillow ``BILINEAR``. Pillow widens the
   triangle filter by the scale factor when shrinking, so this is an antialiased bilinear
   (what ``torchvision`` calls ``antialias=True``), which the GPU path can reproduce. No
   ``reducing_gap``: that would trade exactness for speed. The longer side is
   ``int(size * long / short)``, as torchvision computes it;
4. centre crop ``size`` x ``size``; the offset is ``round((side - size) / 2)``.

The result is RGB uint8, HWC, C-contiguous.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

INPUT_SIZE = 224

_WHITE_RGBA = (255, 255, 255, 255)
# Modes whose samples are wider than 8 bits; Pillow's convert("RGB") clips them instead of
# scaling, which turns almost every 16-bit greyscale image white.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB, alpha composited on white."""
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


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``size``."""
    if height <= width:
        return size, max(size, int(size * width / height))
    return max(size, int(size * height / width)), size


def resize_and_crop(rgb: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Shorter side to ``size`` (antialiased bilinear), then centre crop; RGB uint8 HWC."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    new_height, new_width = resized_shape(height, width, size)
    img = Image.fromarray(rgb)
    if (new_height, new_width) != (height, width):
        img = img.resize((new_width, new_height), Image.Resampling.BILINEAR)
    top = round((new_height - size) / 2.0)
    left = round((new_width - size) / 2.0)
    cropped = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(cropped, dtype=np.uint8))


def reference_preprocess(img: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Slow, obviously correct reference: full-size decode, then the definition above.

    Fast paths are tested against this; it never uses draft / shrink-on-load.
    """
    img.load()
    oriented = ImageOps.exif_transpose(img)
    rgb = to_rgb(oriented)
    return resize_and_crop(np.asarray(rgb, dtype=np.uint8), size)
