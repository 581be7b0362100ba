"""The role the pipeline's embed stage depends on.

Light on purpose (numpy only, no torch): the pipeline types itself against ``Embedder``
from here; ``workers.embed.embedder.ModelEmbedder`` is the implementation.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from workers.decode.types import Preprocess


class Embedder(Protocol):
    """Batches of preprocessed images in, one unit vector per image out."""

    # Stored with every vector: vectors of different models never mix in one index.
    model_id: str

    @property
    def preprocess(self) -> Preprocess:
        """The pixels the model wants; decoders produce them (workers.decode.preprocess)."""
        ...

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, dim], L2-normalised rows (called on a thread)."""
        ...
