"""What a decode returns, and the role the pipeline's decode stage depends on.

Light on purpose (numpy only: no Pillow, OpenCV, libvips or torch): the pipeline types
itself against ``Decoder`` and ``DecodeResult`` from here, and every decoder (the CPU
``decode_image``, the process ``DecodePool``, the GPU-fronted ``RoutedDecoder``) returns a
``DecodeResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


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


class Decoder(Protocol):
    """Decode and preprocess one image; failures raise ``JobFailure`` subclasses with a
    reason code (``UnrecoverableError`` when the decoder itself is gone for good)."""

    async def decode(self, data: bytes) -> DecodeResult: ...
