"""GPU JPEG decode (nvJPEG through ``torchvision.io.decode_jpeg``) and the CPU/GPU router.

Baseline and progressive 8-bit JPEGs with one or three components go to nvJPEG; PNG,
WebP, CMYK / Adobe JPEGs, 12-bit and lossless JPEGs, and anything nvJPEG rejects go to the
CPU pool. The router sends an eligible JPEG to whichever side promises the shorter wait:
in-flight jobs divided by that side's measured rate (an exponentially weighted average),
so a saturated GPU spills JPEGs to the CPU and an idle one takes them all.

On machines without CUDA (or without torchvision) ``gpu_available()`` is False and the
router sends everything to the CPU; the routing logic is pure and unit-tested anywhere.
The GPU resize reproduces ``preprocess.resize_and_crop`` (antialiased bilinear, shorter
side to ``size``, centre crop with the same rounding).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from workers.decode.preprocess import INPUT_SIZE, resized_shape

Side = Literal["cpu", "gpu"]

# Start-of-frame markers: 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive;
# the rest (lossless, hierarchical, arithmetic coding) are not for nvJPEG.
_SOF_KINDS = {0xC0: "baseline", 0xC1: "baseline", 0xC2: "progressive"}
_OTHER_SOF = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


@dataclass(frozen=True)
class JpegInfo:
    kind: str  # baseline | progressive | other
    precision_bits: int
    components: int
    adobe: bool  # an APP14 Adobe segment: often CMYK / YCCK, which nvJPEG mishandles
    height: int = 0
    width: int = 0


def jpeg_info(data: bytes) -> JpegInfo | None:
    """Walk the JPEG markers up to the frame header; None if not a parseable JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, adobe = 2, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xEE and data[pos + 4 : pos + 9] == b"Adobe":
            adobe = True
        if marker in _SOF_KINDS or marker in _OTHER_SOF:
            if pos + 10 > len(data):
                return None
            return JpegInfo(
                kind=_SOF_KINDS.get(marker, "other"),
                precision_bits=data[pos + 4],
                components=data[pos + 9],
                adobe=adobe,
                height=int.from_bytes(data[pos + 5 : pos + 7], "big"),
                width=int.from_bytes(data[pos + 7 : pos + 9], "big"),
            )
        if marker == 0xDA:  # start of scan before any frame header: broken
            return None
        pos += 2 + length
    return None


def gpu_eligible(data: bytes) -> bool:
    info = jpeg_info(data)
    return (
        info is not None
        and info.kind in ("baseline", "progressive")
        and info.precision_bits == 8
        and info.components in (1, 3)
        and not info.adobe
    )


@dataclass
class _SideLoad:
    in_flight: int = 0
    rate_per_s: float = 0.0  # EWMA of completed images per second of busy time


@dataclass
class DecodeRouter:
    """Chooses the decode side per image; thread-safe; feed it completions via ``done``."""

    gpu_available: bool
    cpu_rate_per_s: float = 100.0  # priors until measurements arrive
    gpu_rate_per_s: float = 1000.0
    smoothing: float = 0.2
    _loads: dict[str, _SideLoad] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._loads = {
            "cpu": _SideLoad(rate_per_s=self.cpu_rate_per_s),
            "gpu": _SideLoad(rate_per_s=self.gpu_rate_per_s),
        }

    def expected_wait_s(self, side: Side) -> float:
        load = self._loads[side]
        return (load.in_flight + 1) / max(load.rate_per_s, 1e-6)

    def route(self, data: bytes) -> Side:
        """Pick a side for ``data`` and count it in flight there."""
        with self._lock:
            side: Side = "cpu"
            if (
                self.gpu_available
                and gpu_eligible(data)
                and self.expected_wait_s("gpu") <= self.expected_wait_s("cpu")
            ):
                side = "gpu"
            self._loads[side].in_flight += 1
            return side

    def done(self, side: Side, images: int, busy_s: float) -> None:
        """Report ``images`` finished on ``side`` after ``busy_s`` seconds of work."""
        with self._lock:
            load = self._loads[side]
            load.in_flight = max(0, load.in_flight - images)
            if images > 0 and busy_s > 0:
                rate = images / busy_s
                load.rate_per_s += self.smoothing * (rate - load.rate_per_s)

    def in_flight(self, side: Side) -> int:
        return self._loads[side].in_flight


def gpu_available() -> bool:
    try:
        import torch
        import torchvision.io  # noqa: F401
    except Exception:
        return False
    return bool(torch.cuda.is_available())


class GpuJpegDecoder:
    """Batched nvJPEG decode plus the reference resize and crop, on one CUDA device."""

    def __init__(self, size: int = INPUT_SIZE, device: str = "cuda") -> None:
        if not gpu_available():
            raise RuntimeError("GPU JPEG decode needs CUDA and torchvision")
        self.size = size
        self.device = device

    def decode_batch(self, images: list[bytes]) -> list[np.ndarray | Exception]:
        """One result per input: an RGB uint8 array, or the exception for that image."""
        import torch
        import torch.nn.functional as functional
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        try:
            decoded: list[Any] = decode_jpeg(
                tensors, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True
            )
        except RuntimeError:
            # One bad image fails the batch call: retry one by one to find it.
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(
                        decode_jpeg(
                            tensor,
                            mode=ImageReadMode.RGB,
                            device=self.device,
                            apply_exif_orientation=True,
                        )
                    )
                except RuntimeError as exc:
                    decoded.append(exc)
        out: list[np.ndarray | Exception] = []
        for chw in decoded:
            if isinstance(chw, Exception):
                out.append(chw)
                continue
            height, width = int(chw.shape[1]), int(chw.shape[2])
            new_h, new_w = resized_shape(height, width, self.size)
            resized = functional.interpolate(
                chw[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True
            )[0]
            top = round((new_h - self.size) / 2.0)
            left = round((new_w - self.size) / 2.0)
            crop = resized[:, top : top + self.size, left : left + self.size]
            hwc = crop.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
            out.append(hwc.cpu().numpy())
        return out
