"""The default model against the reference package ``efficientnet-lite-pytorch``.

The reference builds EfficientNet-Lite0 its own way (static "same" padding modules, its
own block classes) and loads the same ImageNet weights file; its pooled penultimate
features and ours must agree, with and without batch-norm folding, and the whole CPU path
(the project's decoder, ONNX Runtime) must give the reference's vectors on real photos.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from workers.decode.cpu import decode_image
from workers.decode.preprocess import reference_preprocess
from workers.embed.efficientnet_lite import FEATURE_DIM, pretrained, weights_path
from workers.embed.embedder import ModelEmbedder
from workers.embed.model import load_model

reference_package = pytest.importorskip("efficientnet_lite_pytorch")
skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    model = reference_package.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_path())
    )
    return model.eval()


def _reference_vectors(reference: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        pooled = reference._avg_pooling(reference.extract_features(x)).flatten(1)
    return torch.nn.functional.normalize(pooled, dim=1)


def _cosines(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return torch.nn.functional.cosine_similarity(a.float(), b.float()).numpy()


@pytest.mark.parametrize("fold", [False, True])
def test_features_match_the_reference_package(reference: torch.nn.Module, fold: bool) -> None:
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    ours = pretrained(fold=fold)
    with torch.inference_mode():
        got = ours(x)
        raw = ours.features(x)
    assert got.shape == (3, FEATURE_DIM)
    assert _cosines(got, _reference_vectors(reference, x)).min() >= 0.9999
    if not fold:  # the very same arithmetic, layer for layer
        with torch.inference_mode():
            expected = reference._avg_pooling(reference.extract_features(x)).flatten(1)
        torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5)


def test_the_worker_path_gives_the_reference_vectors_on_photos(
    reference: torch.nn.Module,
) -> None:
    loaded = load_model("default")
    embedder = ModelEmbedder(loaded, threads=2)
    card = embedder.card
    files = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(buffer, "PNG")
        files.append(buffer.getvalue())
    # The pipeline: the project's decoder with the card's preprocessing, then the engine
    # a CPU worker runs (ONNX Runtime on the exported, folded graph).
    pixels = np.stack([decode_image(data, preprocess=card.preprocess).pixels for data in files])
    got = embedder.embed(pixels)
    assert embedder.backend == "onnxruntime"
    # The reference: full-size decode, the reference preprocessing, the reference model.
    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    expected_pixels = np.stack(
        [reference_preprocess(Image.open(io.BytesIO(data)), card.preprocess) for data in files]
    )
    x = (torch.from_numpy(expected_pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    assert _cosines(got, _reference_vectors(reference, x)).min() >= 0.999


def test_the_default_tells_different_photos_apart() -> None:
    embedder = ModelEmbedder(load_model("default"), threads=2)
    batch = np.stack(
        [
            reference_preprocess(
                Image.fromarray(getattr(skimage_data, name)()).convert("RGB"),
                embedder.card.preprocess,
            )
            for name in PHOTOS
        ]
    )
    vectors = embedder.embed(batch)
    similarity = vectors @ vectors.T
    off_diagonal = similarity[~np.eye(len(PHOTOS), dtype=bool)]
    assert off_diagonal.max() < 0.8  # pretrained features: distinct photos are far apart
