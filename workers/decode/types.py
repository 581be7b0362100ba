"""What a decode returns, and the role the pipeline's decode stage depends on.

Light on purpose (numpy only: no Pillow, OpenCV, libvips or torch): the pipeline types
itself against ``Decoder``, ``DecodeResult`` and ``Preprocess`` (what a model wants; its
definition is ``workers.decode.preprocess``'s docstring) from here, and every decoder (the CPU
``decode_image``, the process ``DecodePool``, the GPU-fronted ``RoutedDecoder``) returns a
``DecodeResult``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np

INPUT_SIZE = 224
FALLBACK_SUFFIX = "-fallback"  # DecodeResult.path of an image a fallback decoder read

Resize = Literal["crop", "squash", "pad"]
Interpolation = Literal["bilinear", "bicubic"]
RESIZE_MODES: tuple[str, ...] = ("crop", "squash", "pad")
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its input pixels (the model card's ``preprocess``)."""

    size: int = INPUT_SIZE
    resize: Resize = "crop"
    interpolation: Interpolation = "bilinear"
    # crop only: the share of the resized shorter side the crop keeps (timm's crop_pct).
    crop_pct: float = 1.0
    fill: tuple[int, int, int] = (255, 255, 255)  # pad only
    # crop only: the crop's offset, (side - size) / 2 rounded half to even as torchvision
    # (timm, open_clip) does, or floored as Hugging Face's image processors do; they differ
    # by a pixel when the margin is 3 mod 4.
    crop_offset: Literal["round", "floor"] = "round"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"preprocess size must be positive, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocess resize {self.resize!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"preprocess crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.fill) != 3 or not all(0 <= v <= 255 for v in self.fill):
            raise ValueError(f"preprocess fill must be 3 values 0..255, got {self.fill}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"preprocess crop_offset {self.crop_offset!r} is not round or floor")

    @property
    def scale_size(self) -> int:
        """The shorter side before the crop (crop mode); ``size`` otherwise."""
        if self.resize != "crop":
            return self.size
        return max(self.size, math.floor(self.size / self.crop_pct))

    def describe(self) -> str:
        """One short phrase for logs and refusals: ``224 px crop 0.875 bicubic``."""
        extra = f" {self.crop_pct:g}" if self.resize == "crop" and self.crop_pct < 1 else ""
        return f"{self.size} px {self.resize}{extra} {self.interpolation}"

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["fill"] = list(self.fill)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocess:
        fill = tuple(int(v) for v in raw.get("fill", (255, 255, 255)))
        return cls(
            size=int(raw.get("size", INPUT_SIZE)),
            resize=raw.get("resize", "crop"),
            interpolation=raw.get("interpolation", "bilinear"),
            crop_pct=float(raw.get("crop_pct", 1.0)),
            fill=(fill[0], fill[1], fill[2]),
            crop_offset=raw.get("crop_offset", "round"),
        )


DEFAULT_PREPROCESS = Preprocess()


@dataclass
class DecodeResult:
    pixels: np.ndarray  # uint8, size x size x 3, RGB, C-contiguous
    format: str  # from sniff_format
    width: int  # original, before EXIF rotation
    height: int
    recovered: bool  # a truncated file whose decodable part was used
    decode_ms: float
    path: str  # which decoder path produced the pixels, e.g. "pillow-draft", "nvjpeg"
    decoded_fraction: float = 1.0  # share of the image's rows that were really decoded
    on_gpu: bool = False  # decoded by nvJPEG (the GPU path), not by a CPU decoder
    colour_from: str = ""  # the embedded ICC profile converted to sRGB ("": none needed)

    @property
    def fallback(self) -> bool:
        """The format's own decoder failed and another one read the image."""
        return self.path.endswith(FALLBACK_SUFFIX)


class Decoder(Protocol):
    """Decode and preprocess one image; failures raise ``JobFailure`` subclasses with a
    reason code (``UnrecoverableError`` when the decoder itself is gone for good)."""

    async def decode(self, data: bytes) -> DecodeResult: ...
