"""GPU JPEG decode (nvJPEG through ``torchvision.io.decode_jpeg``) and the JPEG header checks.

Baseline and progressive 8-bit JPEGs with one or three components are ``gpu_eligible``;
PNG, WebP, CMYK / Adobe JPEGs, 12-bit and lossless JPEGs, and anything nvJPEG rejects go
to the CPU pool (the choice per image is ``routing.DecodeRouter``'s). ``jpeg_info`` reads
the frame header alone, so eligibility and the pixel cap cost no decode.

On machines without CUDA (or without torchvision) ``gpu_available()`` is False; nothing
here imports torch until a ``GpuJpegDecoder`` runs. The GPU resize reproduces
``preprocess.resize_and_crop`` for the model's ``Preprocess``: the same ``plan`` (crop,
squash or pad, with the same rounding) and an antialiased bilinear or bicubic filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.decode.preprocess import DEFAULT_PREPROCESS, Preprocess, plan

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
    # An APP2 ICC_PROFILE segment: its colours need converting to sRGB, which the CPU
    # path does and nvJPEG does not.
    icc: bool = False


def jpeg_info(data: bytes) -> JpegInfo | None:
    """Walk the JPEG markers up to the frame header; None if not a parseable JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, adobe, icc = 2, False, False
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
        if marker == 0xE2 and data[pos + 4 : pos + 16] == b"ICC_PROFILE\0":
            icc = True
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
                icc=icc,
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
        and not info.icc
    )


def gpu_available() -> bool:
    try:
        import torch
        import torchvision.io  # noqa: F401
    except Exception:
        return False
    return bool(torch.cuda.is_available())


class GpuJpegDecoder:
    """Batched nvJPEG decode plus the reference resize and crop, on one CUDA device."""

    def __init__(self, preprocess: Preprocess = DEFAULT_PREPROCESS, device: str = "cuda") -> None:
        if not gpu_available():
            raise RuntimeError("GPU JPEG decode needs CUDA and torchvision")
        self.preprocess = preprocess
        self.device = device

    def decode_batch(self, images: list[bytes]) -> list[np.ndarray | Exception]:
        """One result per input: an RGB uint8 array, or the exception for that image."""
        import torch
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
            out.append(self._geometry(chw))
        return out

    def _geometry(self, chw: Any) -> np.ndarray:
        """``preprocess.plan`` on the device: the CPU path's resize, crop or pad."""
        import torch
        import torch.nn.functional as functional

        spec = self.preprocess
        geometry = plan(int(chw.shape[1]), int(chw.shape[2]), spec)
        resized = functional.interpolate(
            chw[None].float(), size=geometry.resized, mode=spec.interpolation, antialias=True
        )[0]
        top, left = geometry.offset
        size = geometry.size
        if geometry.pads:
            fill = torch.tensor(spec.fill, dtype=resized.dtype, device=resized.device)
            crop = fill.view(3, 1, 1).expand(3, size, size).clone()
            crop[:, -top : -top + resized.shape[1], -left : -left + resized.shape[2]] = resized
        else:
            crop = resized[:, top : top + size, left : left + size]
        hwc = crop.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
        result: np.ndarray = hwc.cpu().numpy()
        return result
