"""hf:REPO_OR_DIR models: the card derived from the image processor, and pixel/vector parity.

Tiny models are built here and saved with ``save_pretrained`` (the hub is unreachable), then
loaded through ``load_family`` offline. Parity is checked twice: our decoder's uint8 pixels
against the processor's ``pixel_values`` (un-normalised), and our engine's vectors against
the library's own forward on the processor's output (cosine >= 0.999).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import ConfigError
from tests.support.parity import library_parity
from workers.decode.preprocess import Preprocess, reference_preprocess
from workers.embed.families import load_family
from workers.embed.model import LoadedModel

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A tiny ViT: enough layers and width to separate images, fast to build and run.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


@dataclass
class Tiny:
    """One saved tiny model: where it is, the reference model, its processor, its head."""

    directory: Path
    model: Any
    processor: Any
    head: Callable[[Any, torch.Tensor], torch.Tensor]  # (model, pixel_values) -> [N, D]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    # Real photographs of three shapes: 512x512, 300x451, 400x600.
    return {
        "astronaut": skimage_data.astronaut(),
        "chelsea": skimage_data.chelsea(),
        "coffee": skimage_data.coffee(),
    }


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-models")


def _pil_processor(name: str, **kwargs: Any) -> Any:
    # The PIL backend, which load_family asks for: transformers 5 names it ...Pil (its
    # default class is the torchvision one where torchvision is installed); 4 has only it.
    return (getattr(transformers, f"{name}Pil", None) or getattr(transformers, name))(**kwargs)


def _save(directory: Path, model: Any, processor: Any) -> Path:
    model.eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _clip_processor(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 32, "width": 32},
        "resample": 3,  # PIL bicubic
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }
    kwargs.update(overrides)
    return _pil_processor("CLIPImageProcessor", **kwargs)


def _image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    # transformers 4 returns the tensor, 5 a BaseModelOutputWithPooling around it.
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_tower(models_dir: Path) -> Tiny:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        **TINY, intermediate_size=64, image_size=32, patch_size=8, projection_dim=16
    )
    model = transformers.CLIPVisionModelWithProjection(config)
    directory = _save(models_dir / "clip-tower", model, _clip_processor())
    return Tiny(directory, model, _clip_processor(), lambda m, x: m(pixel_values=x).image_embeds)


@pytest.fixture(scope="module")
def clip_full(models_dir: Path) -> Tiny:
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        vision_config={**TINY, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        text_config={**TINY, "intermediate_size": 64, "vocab_size": 100},
        projection_dim=24,
    )
    model = transformers.CLIPModel(config)
    directory = _save(models_dir / "clip-full", model, _clip_processor())
    return Tiny(directory, model, _clip_processor(), _image_features)


def _bit_processor() -> Any:
    return _pil_processor(
        "BitImageProcessor",
        size={"shortest_edge": 46},
        crop_size={"height": 32, "width": 32},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def _dinov2(seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(**TINY, mlp_ratio=2, image_size=32, patch_size=8)
    return transformers.Dinov2Model(config).eval()


@pytest.fixture(scope="module")
def dinov2(models_dir: Path) -> Tiny:
    model = _dinov2(seed=2)
    directory = _save(models_dir / "dinov2", model, _bit_processor())
    return Tiny(directory, model, _bit_processor(), lambda m, x: m(pixel_values=x).pooler_output)


def _siglip_processor(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "size": {"height": 32, "width": 32},
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    kwargs.update(overrides)
    return _pil_processor("SiglipImageProcessor", **kwargs)


@pytest.fixture(scope="module")
def siglip(models_dir: Path) -> Tiny:
    torch.manual_seed(3)
    config = transformers.SiglipVisionConfig(
        **TINY, intermediate_size=64, image_size=32, patch_size=8
    )
    model = transformers.SiglipVisionModel(config)
    directory = _save(models_dir / "siglip", model, _siglip_processor())
    return Tiny(directory, model, _siglip_processor(), lambda m, x: m(pixel_values=x).pooler_output)


def _vit_processor() -> Any:
    # No rescale: the processor normalises 0..255 values by 127.5, i.e. [-1, 1] inputs.
    return _pil_processor(
        "ViTImageProcessor",
        size={"height": 32, "width": 32},
        resample=2,
        do_rescale=False,
        image_mean=[127.5, 127.5, 127.5],
        image_std=[127.5, 127.5, 127.5],
    )


@pytest.fixture(scope="module")
def vit_classifier(models_dir: Path) -> Tiny:
    torch.manual_seed(4)
    config = transformers.ViTConfig(
        **TINY, intermediate_size=64, image_size=32, patch_size=8, num_labels=5
    )
    model = transformers.ViTForImageClassification(config)
    directory = _save(models_dir / "vit", model, _vit_processor())

    def mean_tokens(m: Any, x: torch.Tensor) -> torch.Tensor:
        return m.vit(pixel_values=x).last_hidden_state.mean(dim=1)

    return Tiny(directory, model, _vit_processor(), mean_tokens)


def _load(directory: Path, tmp_path: Path, weights: str = "") -> LoadedModel:
    return load_family(
        f"hf:{directory}", cache_dir=tmp_path / "cache", offline=True, weights=weights
    )


def _assert_parity(loaded: LoadedModel, tiny: Tiny, photos: dict[str, np.ndarray]) -> np.ndarray:
    """Cosines of our vectors to the library's (its image processor and its model)."""
    pils = [Image.fromarray(rgb) for rgb in photos.values()]
    theirs = tiny.processor(images=pils, return_tensors="pt")["pixel_values"]
    return library_parity(loaded, pils, theirs, lambda x: tiny.head(tiny.model.eval(), x))


def test_clip_vision_tower_card_and_parity(
    clip_tower: Tiny, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    loaded = _load(clip_tower.directory, tmp_path)
    card = loaded.card
    assert card.preprocess.size == 32 and card.preprocess.resize == "crop"
    assert card.preprocess.scale_size == 40  # shortest_edge, crop_pct = 32 / 40
    assert card.preprocess.crop_pct == pytest.approx(0.8)
    assert card.preprocess.interpolation == "bicubic"
    assert card.mean == pytest.approx(CLIP_MEAN) and card.std == pytest.approx(CLIP_STD)
    assert card.output_dim == 16  # the projection, not the hidden size
    _assert_parity(loaded, clip_tower, photos)


def test_full_clip_model_loads_its_image_tower(
    clip_full: Tiny, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    loaded = _load(clip_full.directory, tmp_path)
    assert loaded.card.output_dim == 24  # CLIPModel's projection_dim: get_image_features
    module = loaded.require_module()
    assert not any(name.startswith("model.text_model") for name, _ in module.named_parameters())
    _assert_parity(loaded, clip_full, photos)


def test_dinov2_card_and_parity(
    dinov2: Tiny, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    loaded = _load(dinov2.directory, tmp_path)
    card = loaded.card
    assert (card.preprocess.size, card.preprocess.resize, card.preprocess.scale_size) == (
        32,
        "crop",
        46,
    )
    assert card.preprocess.interpolation == "bicubic"
    assert card.mean == pytest.approx(IMAGENET_MEAN) and card.std == pytest.approx(IMAGENET_STD)
    assert card.output_dim == 32  # pooler_output: the CLS token after the final layernorm
    _assert_parity(loaded, dinov2, photos)


def test_siglip_card_is_a_squash_and_parity_holds(
    siglip: Tiny, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    loaded = _load(siglip.directory, tmp_path)
    assert loaded.card.preprocess == Preprocess(32, "squash", "bicubic")
    assert loaded.card.mean == (0.5, 0.5, 0.5) and loaded.card.std == (0.5, 0.5, 0.5)
    assert loaded.card.output_dim == 32
    _assert_parity(loaded, siglip, photos)


def test_vit_classifier_without_pooler_and_rescale_folded_into_mean_std(
    vit_classifier: Tiny, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    # A task checkpoint loads as its base model; it has no pooler weights, so the embedding
    # is the token mean, not a randomly initialised pooler.
    loaded = _load(vit_classifier.directory, tmp_path)
    card = loaded.card
    assert card.preprocess == Preprocess(32, "squash", "bilinear")
    # (pixel - 127.5) / 127.5 is (pixel / 255 - 0.5) / 0.5.
    assert card.mean == pytest.approx((0.5,) * 3) and card.std == pytest.approx((0.5,) * 3)
    assert card.output_dim == 32
    _assert_parity(loaded, vit_classifier, photos)


def test_a_weights_file_replaces_the_saved_weights(
    dinov2: Tiny, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    other = _dinov2(seed=5)
    weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    loaded = _load(dinov2.directory, tmp_path, weights=str(weights))
    _assert_parity(loaded, Tiny(dinov2.directory, other, dinov2.processor, dinov2.head), photos)
    assert loaded.model_id != _load(dinov2.directory, tmp_path).model_id

    torch.save({"state_dict": other.state_dict()}, tmp_path / "wrapped.pth")
    wrapped = _load(dinov2.directory, tmp_path, weights=str(tmp_path / "wrapped.pth"))
    assert wrapped.model_id == loaded.model_id  # same weights, same id, whatever the file

    partial = {k: v for k, v in other.state_dict().items() if "layer.1." not in k}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="lacks"):
        _load(dinov2.directory, tmp_path, weights=str(tmp_path / "partial.pth"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights"):
        _load(dinov2.directory, tmp_path, weights=str(tmp_path / "junk.bin"))
    with pytest.raises(ConfigError, match="does not exist"):
        _load(dinov2.directory, tmp_path, weights=str(tmp_path / "missing.pth"))


def test_model_id_is_the_sanitised_spec_and_a_stable_hash(clip_tower: Tiny, tmp_path: Path) -> None:
    first = _load(clip_tower.directory, tmp_path)
    again = _load(clip_tower.directory, tmp_path)
    assert first.model_id == again.model_id
    prefix, _, tail = first.model_id.rpartition("-")
    assert prefix == "hf-" + str(clip_tower.directory).replace("/", "-")
    assert len(tail) == 12 and int(tail, 16) >= 0
    assert first.onnx_on_cpu is False and first.onnx_path is None
    module = first.require_module()
    assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_offline_and_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_family(f"hf:{tmp_path / 'nowhere'}", cache_dir=tmp_path, offline=True, weights="")
    with pytest.raises(ConfigError, match="not in the cache"):
        load_family("hf:nobody/no-such-model", cache_dir=tmp_path, offline=True, weights="")


@pytest.mark.parametrize(
    "spec", ["hf:", "hf", "nope:thing", "timm", "open_clip:", "ViT-B-32", "hf:   "]
)
def test_a_malformed_spec_is_a_config_error(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected timm:NAME"):
        load_family(spec, cache_dir=tmp_path, offline=True, weights="")


def test_a_directory_that_is_not_a_model_is_a_one_line_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_family(f"hf:{tmp_path / 'empty'}", cache_dir=tmp_path, offline=True, weights="")
    assert "\n" not in str(caught.value) and "cannot be loaded" in str(caught.value)


@pytest.mark.parametrize(
    ("processor", "message"),
    [
        (lambda: _clip_processor(do_center_crop=False), "not square"),
        (lambda: _clip_processor(resample=0), "'nearest'"),
        (lambda: _clip_processor(resample=1), "'lanczos'"),
        (lambda: _clip_processor(crop_size={"height": 32, "width": 24}), "not square"),
        (lambda: _clip_processor(crop_size={"height": 48, "width": 48}), "pad"),
        (lambda: _siglip_processor(size={"height": 32, "width": 48}), "not square"),
        (lambda: _siglip_processor(do_resize=False), "does not resize"),
    ],
)
def test_a_processor_we_cannot_reproduce_is_refused(
    clip_tower: Tiny, processor: Callable[[], Any], message: str, tmp_path: Path
) -> None:
    directory = _save(tmp_path / "model", clip_tower.model, processor())
    with pytest.raises(ConfigError, match=message):
        _load(directory, tmp_path)


def test_missing_libraries_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("transformers", "timm", "open_clip"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    cases = {
        "hf:org/repo": "imgfleet\\[hf\\]",
        "timm:resnet18": "imgfleet\\[vision\\].*torchvision",
        "open_clip:ViT-B-32/laion2b_s34b_b79k": "imgfleet\\[vision\\].*torchvision",
    }
    for spec, extra in cases.items():
        with pytest.raises(ConfigError, match=extra):
            load_family(spec, cache_dir=tmp_path, offline=True, weights="")


def test_hf_centre_crop_offset_matches_for_odd_margins(clip_tower: Tiny, tmp_path: Path) -> None:
    loaded = _load(clip_tower.directory, tmp_path)
    # 400 x 430: the long side resizes to int(40 * 430 / 400) = 43, an 11 px margin.
    img = Image.fromarray(skimage_data.coffee()).resize((430, 400))
    ours = reference_preprocess(img, loaded.card.preprocess).astype(np.float64)
    theirs = clip_tower.processor(images=[img], return_tensors="np")["pixel_values"][0]
    mean = np.asarray(loaded.card.mean).reshape(3, 1, 1)
    std = np.asarray(loaded.card.std).reshape(3, 1, 1)
    np.testing.assert_allclose(((theirs * std + mean) * 255).transpose(1, 2, 0), ours, atol=1e-3)
