"""The default model, the plumbing CNN, TorchScript loading, model cards and the ModelEmbedder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from common.errors import ConfigError
from tests.support.models import save_plumbing_as_torchscript
from workers.decode.preprocess import Preprocess
from workers.embed.embedder import ModelEmbedder
from workers.embed.model import (
    DEFAULT_MODEL_NAME,
    PLUMBING,
    ModelCard,
    card_path_for,
    load_model,
)
from workers.embed.plumbing import PlumbingCNN

INPUT_SIZE = 224
N_SYNTHETIC = 40


def _random_batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, 3))
    return (r, g, b)


def _synthetic_image(rng: np.random.Generator, width: int = 800, height: int = 600) -> Image.Image:
    """A catalogue-like stand-in: background, a few shapes and stripes, sometimes noise."""
    background = _colour(rng)
    if rng.random() < 0.5:
        ramp = np.linspace(0.0, 1.0, width)[None, :, None]
        rows = np.array(background) * (1 - ramp) + np.array(_colour(rng)) * ramp
        image = Image.fromarray(rows.repeat(height, axis=0).astype(np.uint8))
    else:
        image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        colour = _colour(rng)
        x0, y0 = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
        x1, y1 = x0 + int(rng.integers(60, 400)), y0 + int(rng.integers(60, 300))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 2:
            corners = int(rng.integers(3, 7))
            points = [
                (int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(corners)
            ]
            draw.polygon(points, fill=colour)
        else:
            stripe_px = int(rng.integers(6, 30))
            for x in range(x0, x1, 2 * stripe_px):
                draw.rectangle([x, y0, x + stripe_px, y1], fill=colour)
    pixels = np.asarray(image).astype(np.int16)
    if rng.random() < 0.5:
        pixels += rng.integers(-25, 26, pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _centre_resize(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Short side to size, then the centre size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _degraded_copy(image: Image.Image) -> np.ndarray:
    """What a CDN does to a product image: downscaled to 60% and re-encoded as JPEG q70."""
    width, height = image.size
    small = image.resize((round(width * 0.6), round(height * 0.6)), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=70)
    return _centre_resize(Image.open(io.BytesIO(buffer.getvalue())))


@pytest.fixture(scope="module")
def default_embedder() -> ModelEmbedder:
    return ModelEmbedder(load_model(None), threads=2)


@pytest.fixture(scope="module")
def plumbing_embedder() -> ModelEmbedder:
    return ModelEmbedder(load_model(PLUMBING), threads=2)


def test_the_default_is_pretrained_efficientnet_lite0(default_embedder: ModelEmbedder) -> None:
    card = default_embedder.card
    assert card.name == DEFAULT_MODEL_NAME == "efficientnet-lite0-imagenet"
    assert card.output_dim == 1280 and card.mean == card.std == (0.5, 0.5, 0.5)
    assert card.preprocess == Preprocess(224, "crop", "bicubic", crop_pct=0.882)
    # On the CPU it runs through ONNX Runtime (the exported graph of the same module).
    assert default_embedder.backend == "onnxruntime"


def test_the_plumbing_cnn_says_what_it_is(plumbing_embedder: ModelEmbedder) -> None:
    assert plumbing_embedder.model_id.startswith("plumbing-random-cnn-")
    assert plumbing_embedder.dim == 256


def test_default_model_is_deterministic() -> None:
    first, second = load_model(None), load_model("default")
    assert first.model_id == second.model_id
    assert first.model_id.startswith(f"{DEFAULT_MODEL_NAME}-")
    assert len(first.model_id) == len(DEFAULT_MODEL_NAME) + 1 + 12
    batch = _random_batch(4)
    a = ModelEmbedder(first, threads=1).embed(batch)
    b = ModelEmbedder(second, threads=1).embed(batch)
    np.testing.assert_array_equal(a, b)


def test_building_the_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    PlumbingCNN()
    assert torch.equal(torch.rand(3), expected)


def test_outputs_are_unit_norm_with_card_dim(default_embedder: ModelEmbedder) -> None:
    vectors = default_embedder.embed(_random_batch(5))
    assert vectors.dtype == np.float32 and vectors.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert default_embedder.dim == 1280


def test_embedder_normalises_with_the_card(default_embedder: ModelEmbedder) -> None:
    batch = _random_batch(2, seed=7)
    mean = torch.tensor(default_embedder.card.mean).view(1, 3, 1, 1)
    std = torch.tensor(default_embedder.card.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.inference_mode():
        expected = default_embedder.module(x).numpy()
    # The eager module against the ONNX Runtime graph the embedder runs.
    np.testing.assert_allclose(default_embedder.embed(batch), expected, atol=1e-4)


def test_embed_rejects_wrong_input(default_embedder: ModelEmbedder) -> None:
    with pytest.raises(ValueError):
        default_embedder.embed(_random_batch(1).astype(np.float32))
    with pytest.raises(ValueError):
        default_embedder.embed(np.zeros((1, 100, 100, 3), dtype=np.uint8))
    assert default_embedder.embed(_random_batch(0)).shape == (0, 1280)


def test_model_card_json_round_trip(tmp_path: Path) -> None:
    card = ModelCard("clip-ish", preprocess=Preprocess(256), mean=(0.5, 0.5, 0.5), output_dim=512)
    path = card_path_for(tmp_path / "clip-ish.pt")
    assert path.name == "clip-ish.card.json"
    card.save(path)
    assert ModelCard.load(path) == card
    path.write_text('{"name": "x"}')
    with pytest.raises(ConfigError):
        ModelCard.load(path)


def test_torchscript_round_trip(tmp_path: Path, plumbing_embedder: ModelEmbedder) -> None:
    model_path = tmp_path / "default.pt"
    card = save_plumbing_as_torchscript(model_path)
    loaded = load_model(str(model_path))
    assert loaded.card == card
    assert loaded.model_id.startswith(f"{card.name}-")
    assert loaded.model_id != plumbing_embedder.model_id
    assert load_model(str(model_path)).model_id == loaded.model_id
    batch = _random_batch(3, seed=3)
    np.testing.assert_allclose(
        ModelEmbedder(loaded, threads=2).embed(batch), plumbing_embedder.embed(batch), atol=1e-5
    )


def test_torchscript_without_card_probes_output_dim(tmp_path: Path) -> None:
    model_path = tmp_path / "bare.pt"
    save_plumbing_as_torchscript(model_path)
    card_path_for(model_path).unlink()
    loaded = load_model(str(model_path))
    assert loaded.card.output_dim == 256
    assert loaded.card.name == "bare" and loaded.card.input_size == 224


def test_bad_model_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_model(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError):
        load_model(str(junk))


def test_degraded_copies_find_their_original(default_embedder: ModelEmbedder) -> None:
    rng = np.random.default_rng(2024)
    images = [_synthetic_image(rng) for _ in range(N_SYNTHETIC)]
    originals = default_embedder.embed(np.stack([_centre_resize(im) for im in images]))
    copies = default_embedder.embed(np.stack([_degraded_copy(im) for im in images]))
    nearest = (copies @ originals.T).argmax(axis=1)
    hit_rate = float((nearest == np.arange(N_SYNTHETIC)).mean())
    print(f"degraded-copy nearest-neighbour hit rate: {hit_rate:.3f}")
    assert hit_rate >= 0.95
