"""Keep one GPU busy: pinned host buffers, side-stream copies, several batches in flight.

A ``GpuRunner`` is one engine instance. Each of its ``in_flight`` slots owns a pinned
host input buffer, a device input buffer and a pinned host output buffer, allocated once
and reused for every batch (pinned allocation is slow, and only pinned memory copies
asynchronously). For each chunk the host fills a slot's pinned buffer, the copy stream
moves it to the device, the compute stream waits for that copy alone, normalises (uint8
crosses the bus, four times fewer bytes than float32), runs the model and copies the
unit vectors back to pinned memory. While chunk i computes, chunk i+1 is being copied in,
and the host only waits when it needs a slot back.

Only used where CUDA is present; nothing here runs on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.observability.logging import get_logger
from workers.embed.model_card import ModelCard

_log = get_logger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Slot:
    host_in: torch.Tensor  # pinned uint8 [max_batch, H, W, 3]
    device_in: torch.Tensor  # uint8 [max_batch, H, W, 3]
    host_out: torch.Tensor  # pinned float32 [max_batch, dim]
    copied: torch.cuda.Event
    done: torch.cuda.Event
    rows: int = 0  # rows of the chunk now in this slot
    target: int = -1  # index of that chunk in the caller's list; -1: slot free


class GpuRunner:
    """Runs ``forward`` on uint8 NHWC host chunks; returns unit-norm float32 host arrays."""

    def __init__(
        self,
        forward: Forward,
        card: ModelCard,
        *,
        device: torch.device,
        max_batch: int,
        in_flight: int = 2,
        dtype: torch.dtype = torch.float16,
        channels_last: bool = True,
        graph_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        if device.type != "cuda":
            raise ValueError("GpuRunner needs a CUDA device")
        self.forward = forward
        self.card = card
        self.device = device
        self.max_batch = max_batch
        self.dtype = dtype
        self.channels_last = channels_last
        size, dim = card.input_size, card.output_dim
        with torch.cuda.device(device):
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)
            std = torch.tensor(card.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            mean = torch.tensor(card.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._scale = 1.0 / (255.0 * std)
            self._shift = -mean / std
            self._slots = [
                _Slot(
                    host_in=torch.empty(
                        (max_batch, size, size, 3), dtype=torch.uint8, pin_memory=True
                    ),
                    device_in=torch.empty(
                        (max_batch, size, size, 3), dtype=torch.uint8, device=device
                    ),
                    host_out=torch.empty((max_batch, dim), dtype=torch.float32, pin_memory=True),
                    copied=torch.cuda.Event(),
                    done=torch.cuda.Event(),
                )
                for _ in range(max(1, in_flight))
            ]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        for rows in sorted(set(graph_batch_sizes)):
            if rows <= max_batch:
                self._capture(rows)

    # -- model input ----------------------------------------------------------------------

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW as a view keeps the memory channels-last, which cuDNN runs fastest on
        # in half precision; contiguous() would turn it back into NCHW.
        x = pixels.permute(0, 3, 1, 2).float() * self._scale + self._shift
        x = x.to(self.dtype)
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def _capture(self, rows: int) -> None:
        """Record one CUDA graph for ``rows``: later batches of that size replay it."""
        size = self.card.input_size
        static_in = torch.zeros((rows, size, size, 3), dtype=torch.uint8, device=self.device)
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm), torch.inference_mode():
            for _ in range(3):  # cuDNN / allocator warm-up must happen outside the capture
                self.forward(self._prepare(static_in))
        torch.cuda.current_stream(self.device).wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.forward(self._prepare(static_in))
        self._graphs[rows] = (graph, static_in, static_out)
        _log.info("cuda_graph_captured", batch=rows)

    def _compute(self, device_in: torch.Tensor) -> torch.Tensor:
        rows = device_in.shape[0]
        captured = self._graphs.get(rows)
        if captured is None:
            return self.forward(self._prepare(device_in))
        graph, static_in, static_out = captured
        static_in.copy_(device_in)
        graph.replay()
        return static_out

    # -- the pipelined loop ---------------------------------------------------------------

    def run(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """Embed each uint8 [n, H, W, 3] chunk (n <= max_batch); results in the same order."""
        results: list[np.ndarray | None] = [None] * len(chunks)
        with torch.cuda.device(self.device), torch.inference_mode():
            try:
                for index, chunk in enumerate(chunks):
                    slot = self._slots[index % len(self._slots)]
                    self._collect(slot, results)  # the slot's previous chunk, if any
                    self._launch(slot, chunk, index)
                for slot in self._slots:
                    self._collect(slot, results)
            except BaseException:
                # Let queued work finish before the slots' buffers are reused, and forget it:
                # a later call must not collect this call's chunks.
                torch.cuda.synchronize(self.device)
                for slot in self._slots:
                    slot.target = -1
                raise
        return [r for r in results if r is not None]

    def _launch(self, slot: _Slot, chunk: np.ndarray, index: int) -> None:
        rows = chunk.shape[0]
        if rows > self.max_batch:
            raise ValueError(f"chunk of {rows} exceeds the runner's max_batch {self.max_batch}")
        slot.host_in[:rows].numpy()[...] = chunk  # one host memcpy into pinned memory
        with torch.cuda.stream(self.copy_stream):
            slot.device_in[:rows].copy_(slot.host_in[:rows], non_blocking=True)
            slot.copied.record(self.copy_stream)
        self.compute_stream.wait_event(slot.copied)
        with torch.cuda.stream(self.compute_stream):
            out = self._compute(slot.device_in[:rows])
            if out.ndim != 2 or out.shape[1] != self.card.output_dim:
                raise ValueError(
                    f"model output {tuple(out.shape)} does not match output_dim "
                    f"{self.card.output_dim}"
                )
            slot.host_out[:rows].copy_(F.normalize(out.float(), dim=1), non_blocking=True)
            slot.done.record(self.compute_stream)
        slot.rows, slot.target = rows, index

    def _collect(self, slot: _Slot, results: list[np.ndarray | None]) -> None:
        if slot.target < 0:
            return
        slot.done.synchronize()
        results[slot.target] = slot.host_out[: slot.rows].numpy().copy()
        slot.target = -1
