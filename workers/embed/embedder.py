"""Turn batches of preprocessed uint8 images into L2-normalised float32 vectors.

The pipeline hands ``embed`` whatever batch the dynamic batcher closed; shaping it for the
engine happens here: split into chunks the engine runs well, pad each to a preferred batch
size, run, slice the padding off, normalise. Rows that come out non-finite (half-precision
overflow on an odd image) are run again in fp32 on the CPU reference before giving up.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError, Reason, TransientError
from common.observability.logging import get_logger
from workers.batcher import pad_rows, plan_chunks
from workers.decode.types import Preprocess
from workers.embed.backends import Backend, EngineOptions, TorchCpuBackend, open_backends
from workers.embed.model import LoadedModel

_log = get_logger(__name__)


class NonFiniteEmbeddingError(TransientError):
    """The model gave NaN/inf for some rows even in fp32: a model bug, not the image's."""

    reason = Reason.INTERNAL

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass(frozen=True)
class GpuSample:
    """One device's figures for the GPU gauges."""

    index: int
    utilization: float | None  # 0..1; None without NVML (nvidia-ml-py)
    used_bytes: int
    total_bytes: int


def sample_gpu(device: torch.device) -> GpuSample | None:
    """Utilisation and memory of the device the embedder runs on; None on the CPU.

    Memory comes from the CUDA runtime (the whole device, other processes included);
    utilisation from NVML through torch, when nvidia-ml-py is installed. Only the
    embedder's own device is read: querying another would create a CUDA context on it.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free_bytes, total_bytes = torch.cuda.mem_get_info(index)
    utilization: float | None
    try:
        utilization = torch.cuda.utilization(index) / 100.0
    except Exception:  # no pynvml / NVML: memory alone
        utilization = None
    return GpuSample(index, utilization, int(total_bytes - free_bytes), int(total_bytes))


def usable_cpus() -> int:
    # os.cpu_count() reports the host's cores; a container pinned to fewer cores that runs
    # one thread per host core spends its time context switching.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class EmbedStats:
    """Plain counters for metrics: what ran, how much of it was padding, how long it took."""

    calls: int = 0
    images: int = 0
    chunks: int = 0
    padded_rows: int = 0  # rows run only to reach a preferred batch size
    seconds: float = 0.0  # wall time inside embed()
    refused_rows: int = 0  # non-finite even in fp32: raised
    fp32_reruns: int = 0  # non-finite in reduced precision, fixed by the fp32 rerun
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_call(self, images: int, chunks: int, padded_rows: int, seconds: float) -> None:
        with self._lock:
            self.calls += 1
            self.images += images
            self.chunks += chunks
            self.padded_rows += padded_rows
            self.seconds += seconds

    def record_rows(self, *, fp32_reruns: int = 0, refused_rows: int = 0) -> None:
        with self._lock:
            self.fp32_reruns += fp32_reruns
            self.refused_rows += refused_rows

    def as_dict(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "calls": self.calls,
                "images": self.images,
                "chunks": self.chunks,
                "padded_rows": self.padded_rows,
                "seconds": round(self.seconds, 4),
                "refused_rows": self.refused_rows,
                "fp32_reruns": self.fp32_reruns,
            }


class ModelEmbedder:
    """Runs one loaded model through the best engine this machine has.

    Thread-safe: each call borrows one engine instance, so with ``instances`` > 1 (GPU)
    several threads can embed at once and keep more batches in flight.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str = "cpu",
        threads: int | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self.loaded = loaded
        self.card = loaded.card
        self.model_id = loaded.model_id
        self.options = options or EngineOptions()
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"invalid torch device {device!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device {device!r}: only cpu and cuda are supported")
        self.threads = threads or usable_cpus()
        # Process-wide setting: the worker runs one embedder, and decode lives in other
        # processes, so the embedder owns this process's intra-op threads.
        torch.set_num_threads(self.threads)
        opened = open_backends(loaded, self.device, self.options)
        self.backend = opened.backend
        self.precision = opened.precision
        self.preferred_batch_sizes = opened.preferred_batch_sizes
        self.fallback_reason = opened.fallback_reason
        self._instances: queue.Queue[Backend] = queue.Queue()
        for instance in opened.instances:
            self._instances.put(instance)
        self.instances = len(opened.instances)
        self._max_chunk = self.options.max_batch
        self._reference: Backend | None = None
        self._reference_lock = threading.Lock()
        self.stats = EmbedStats()
        _log.info(
            "embedder_ready",
            model_id=self.model_id,
            model_name=self.card.name,
            backend=self.backend,
            device=str(self.device),
            precision=self.precision,
            threads=self.threads,
            preprocess=self.preprocess.describe(),
            output_dim=self.card.output_dim,
            preferred_batch_sizes=list(self.preferred_batch_sizes),
        )

    @property
    def preprocess(self) -> Preprocess:
        """The pixels the model wants (its card's): what the decoders produce for it."""
        return self.card.preprocess

    @property
    def dim(self) -> int:
        return self.card.output_dim

    def gpu_sample(self) -> GpuSample | None:
        """The embedding device's utilisation and memory (None on the CPU)."""
        return sample_gpu(self.device)

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def module(self) -> Any:
        """The fp32 PyTorch module (the reference every engine is checked against)."""
        return self.loaded.module

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] with H = W = card.input_size -> float32 [N, dim], unit rows."""
        size = self.card.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3], got {batch.dtype} {batch.shape}")
        if batch.shape[1:3] != (size, size):
            # Another size would still run (global pooling) but give vectors that do not
            # match the index's; preprocessing owns resizing, so this is a bug upstream.
            raise ValueError(f"expected {size}x{size} images, got {batch.shape[1:3]}")
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        started_s = time.perf_counter()
        plan = plan_chunks(n, self.preferred_batch_sizes, self._max_chunk)
        chunks = [pad_rows(np.ascontiguousarray(batch[c.start : c.stop]), c.padded) for c in plan]
        instance = self._instances.get()
        try:
            outs = instance.run(chunks)
        finally:
            self._instances.put(instance)
        vectors = self._assemble(outs, plan)
        vectors = self._repair_non_finite(batch, vectors)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # Normalise again: a user model may not, and cosine search assumes unit rows.
        vectors = vectors / np.maximum(norms, 1e-12)
        self.stats.record_call(
            images=n,
            chunks=len(plan),
            padded_rows=sum(c.padded - c.rows for c in plan),
            seconds=time.perf_counter() - started_s,
        )
        return vectors.astype(np.float32, copy=False)

    def _assemble(self, outs: list[np.ndarray], plan: list[Any]) -> np.ndarray:
        if len(outs) != len(plan):
            raise RuntimeError(f"engine returned {len(outs)} chunks for {len(plan)}")
        parts = []
        for out, chunk in zip(outs, plan, strict=True):
            if out.ndim != 2 or out.shape != (chunk.padded, self.dim):
                raise ConfigError(
                    f"model {self.model_id} output {tuple(out.shape)} does not match its "
                    f"card's output_dim {self.dim} for a batch of {chunk.padded}"
                )
            parts.append(out[: chunk.rows])
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _repair_non_finite(self, batch: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if bad.size == 0:
            return vectors
        if not (self.precision == "fp32" and self.device.type == "cpu"):
            fixed = self._reference_backend().run([np.ascontiguousarray(batch[bad])])[0]
            vectors = vectors.copy()
            vectors[bad] = fixed
            still = bad[~np.isfinite(fixed).all(axis=1)]
            self.stats.record_rows(fp32_reruns=int(bad.size - still.size))
            bad = still
        if bad.size:
            self.stats.record_rows(refused_rows=int(bad.size))
            raise NonFiniteEmbeddingError(
                f"model {self.model_id} gave non-finite vectors for rows {bad.tolist()}",
                bad.tolist(),
            )
        _log.warning("non-finite rows recomputed in fp32", model_id=self.model_id)
        return vectors

    def _reference_backend(self) -> Backend:
        with self._reference_lock:
            if self._reference is None:
                self._reference = TorchCpuBackend(
                    self.loaded.require_module(), self.card, channels_last=False
                )
            return self._reference
