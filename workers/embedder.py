"""Turn batches of preprocessed uint8 images into L2-normalised float32 vectors."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.logging import get_logger
from workers.model import LoadedModel

_log = get_logger(__name__)


def _usable_cpus() -> int:
    # os.cpu_count() reports the host's cores; a container pinned to fewer cores that runs
    # one thread per host core spends its time context switching.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Embedder:
    """Runs one loaded model on one device. Not thread-safe: one embedder per batcher."""

    def __init__(
        self, loaded: LoadedModel, *, device: str = "cpu", threads: int | None = None
    ) -> None:
        self.loaded = loaded
        self.card = loaded.card
        self.model_id = loaded.model_id
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"invalid torch device {device!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        self.threads = threads or _usable_cpus()
        # Process-wide setting: the worker runs one embedder, and decode lives in other
        # processes, so the embedder may take every core this process is allowed.
        torch.set_num_threads(self.threads)
        self.module = loaded.module.to(self.device).eval()
        # uint8 -> normalised float in one fused multiply-add: x * scale + shift equals
        # (x / 255 - mean) / std.
        std = torch.tensor(self.card.std, dtype=torch.float32)
        mean = torch.tensor(self.card.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        _log.info(
            "embedder_ready",
            model_id=self.model_id,
            model_name=self.card.name,
            device=str(self.device),
            torch_threads=self.threads,
            input_size=self.card.input_size,
            output_dim=self.card.output_dim,
        )

    @property
    def dim(self) -> int:
        return self.card.output_dim

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] with H = W = card.input_size -> float32 [N, dim], unit rows."""
        size = self.card.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3], got {batch.dtype} {batch.shape}")
        if batch.shape[1:3] != (size, size):
            # Another size would still run (global pooling) but give vectors that do not
            # match the index's; preprocessing owns resizing, so this is a bug upstream.
            raise ValueError(f"expected {size}x{size} images, got {batch.shape[1:3]}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            # NHWC -> NCHW as a view: the memory stays channels_last, which CPU and cuDNN
            # convolutions both run fastest on.
            x = pixels.permute(0, 3, 1, 2).float() * self._scale + self._shift
            out = self.module(x)
            if out.ndim != 2 or out.shape[1] != self.dim:
                raise ConfigError(
                    f"model {self.model_id} output {tuple(out.shape)} does not match its "
                    f"card's output_dim {self.dim}"
                )
            # Normalise again: a user model may not, and cosine search assumes unit rows.
            out = F.normalize(out.float(), dim=1)
            return out.cpu().numpy()
