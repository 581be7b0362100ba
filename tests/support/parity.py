"""Parity of a loaded model with its library: the same pixels, then the same vectors.

``library_parity`` takes the library's own preprocessed batch (normalised NCHW, from its
transform or image processor) and its own forward: the batch, un-normalised through the
card's mean/std, must be the pixels the project's reference preprocessing gives, and the
project's embedder on those pixels must give the library's vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from workers.decode.preprocess import reference_preprocess
from workers.embed.embedder import ModelEmbedder
from workers.embed.model import LoadedModel

MIN_COSINE = 0.999


def library_parity(
    loaded: LoadedModel,
    images: list[Image.Image],
    theirs: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """Cosines of our vectors to the library's; raises unless pixels and vectors agree."""
    card = loaded.card
    ours_pixels = np.stack([reference_preprocess(img, card.preprocess) for img in images])
    mean = np.asarray(card.mean).reshape(1, 3, 1, 1)
    std = np.asarray(card.std).reshape(1, 3, 1, 1)
    unnormalised = ((theirs.numpy().astype(np.float64) * std + mean) * 255).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(unnormalised, ours_pixels, atol=1e-3)

    ours = ModelEmbedder(loaded, threads=1).embed(ours_pixels)
    with torch.inference_mode():
        vectors = forward(theirs).numpy()
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines: np.ndarray = (ours * vectors).sum(axis=1)
    assert (cosines >= MIN_COSINE).all(), cosines.tolist()
    # Different photos give different vectors: the comparison above is not vacuous.
    assert float(ours[0] @ ours[1]) < MIN_COSINE
    return cosines
