"""The ViT-B/16-sized benchmark model: its shape, and that the engine runs it."""

from __future__ import annotations

import numpy as np
import torch

from workers.decode.preprocess import Preprocess
from workers.embed.embedder import ModelEmbedder
from workers.embed.model import LoadedModel
from workers.embed.model_card import ModelCard
from workers.embed.model_zoo import VisionTransformer, vit_b16


def test_vit_b16_has_vit_b16_size() -> None:
    loaded = vit_b16()
    assert loaded.module is not None
    parameters = sum(p.numel() for p in loaded.module.parameters())
    # ViT-B/16's image tower is ~86M parameters; the cost per image follows from it.
    assert 85_000_000 < parameters < 88_000_000
    assert loaded.card.output_dim == 512 and loaded.card.input_size == 224


def test_a_small_vit_embeds_through_the_engine() -> None:
    module = VisionTransformer(
        image_size=32, patch_size=16, width=64, depth=2, heads=4, mlp_dim=128, output_dim=16
    )
    card = ModelCard("tiny-vit", preprocess=Preprocess(32), output_dim=16)
    embedder = ModelEmbedder(LoadedModel(module, card, "tiny-vit-0"), threads=1)
    batch = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    vectors = embedder.embed(batch)
    assert vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])  # random weights still separate images
    # Weights depend on the seed alone, not on the caller's random state.
    torch.manual_seed(1)
    again = VisionTransformer(
        image_size=32, patch_size=16, width=64, depth=2, heads=4, mlp_dim=128, output_dim=16
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(module.state_dict().values(), again.state_dict().values(), strict=True)
    )
