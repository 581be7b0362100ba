"""timm: and open_clip: models: the card derived from the library's transform config, and
parity with the library's own eval transform and forward.

Runs in .venv-vision only (timm and open_clip need torchvision); elsewhere the module is
skipped, and tests/unit/test_vision_env.py runs it there. Models are small (timm's
``test_*`` architectures, a registered two-layer CLIP) with random weights saved to a file
here: the hub is unreachable.
"""

from __future__ import annotations

import json
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
from workers.decode.preprocess import Preprocess, plan
from workers.embed.families import load_family
from workers.embed.model import LoadedModel

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

pytestmark = pytest.mark.vision


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = "imgfleet-tiny-clip"
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@dataclass
class Reference:
    """The library's side: its eval transform (PIL -> tensor) and its embedding forward."""

    transform: Callable[[Image.Image], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    # Real photographs: 512x512, 300x451, 400x600.
    return [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]


def odd_margin_photo(spec: Preprocess) -> np.ndarray:
    """A photo whose crop margin is 3 mod 4: a centred crop offset of k + 0.5, k odd, where
    rounding half to even, half up and flooring disagree. torchvision (timm, open_clip)
    rounds; so must we."""
    coffee = Image.fromarray(skimage_data.coffee())
    for width in range(401, 1200):
        geometry = plan(400, width, spec)
        if (geometry.resized[1] - spec.size) % 4 == 3:
            return np.asarray(coffee.resize((width, 400), Image.Resampling.BICUBIC))
    raise AssertionError(f"no odd-margin width for {spec}")


def assert_parity(
    loaded: LoadedModel, reference: Reference, photos: list[np.ndarray]
) -> list[float]:
    """Cosines of our vectors to the library's, after checking the pixels are the same."""
    card = loaded.card
    rgbs = (
        [*photos, odd_margin_photo(card.preprocess)] if card.preprocess.resize == "crop" else photos
    )
    pils = [Image.fromarray(rgb) for rgb in rgbs]
    theirs = torch.stack([reference.transform(img) for img in pils])
    return [float(c) for c in library_parity(loaded, pils, theirs, reference.forward)]


# --- timm -----------------------------------------------------------------------------


def _timm_reference(model: Any) -> Reference:
    model.eval()
    cfg = resolve_data_config({}, model=model)
    return Reference(
        create_transform(**cfg),
        lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
    )


def _timm_checkpoint(name: str, directory: Path) -> tuple[Any, Path]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()  # with its classifier
    path = directory / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet"])
def test_timm_card_follows_resolve_data_config_and_parity_holds(
    name: str, photos: list[np.ndarray], tmp_path: Path
) -> None:
    model, checkpoint = _timm_checkpoint(name, tmp_path)
    loaded = load_family(
        f"timm:{name}", cache_dir=tmp_path / "cache", offline=True, weights=str(checkpoint)
    )
    cfg = resolve_data_config({}, model=model)
    card = loaded.card
    assert card.preprocess == Preprocess(
        cfg["input_size"][-1], "crop", cfg["interpolation"], crop_pct=cfg["crop_pct"]
    )
    assert card.mean == pytest.approx(cfg["mean"]) and card.std == pytest.approx(cfg["std"])
    assert card.output_dim == model.num_features  # pooled features, no classifier
    assert loaded.model_id.startswith(f"timm-{name}-")
    assert_parity(loaded, _timm_reference(model), photos)


def test_timm_weights_as_safetensors_give_the_same_model_id(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, checkpoint = _timm_checkpoint("test_resnet", tmp_path)
    safe = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safe))
    ids = {
        load_family("timm:test_resnet", cache_dir=tmp_path, offline=True, weights=str(p)).model_id
        for p in (checkpoint, safe)
    }
    assert len(ids) == 1


def _timm_local_dir(directory: Path, **pretrained_cfg: Any) -> Path:
    """test_vit saved as timm writes a hub repo, with its pretrained_cfg edited."""
    torch.manual_seed(1)
    save_for_hf(timm.create_model("test_vit", pretrained=False).eval(), str(directory))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["pretrained_cfg"].update(pretrained_cfg)
    config_path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("crop_mode", "mean", "expected"),
    [
        # border: longest side to size, on a canvas of the mean colour.
        ("border", (0.5, 0.4, 0.3), Preprocess(160, "pad", "bicubic", fill=(128, 102, 76))),
        ("squash", (0.5, 0.5, 0.5), Preprocess(160, "squash", "bicubic")),
    ],
)
def test_timm_border_and_squash_crop_modes(
    crop_mode: str,
    mean: tuple[float, float, float],
    expected: Preprocess,
    photos: list[np.ndarray],
    tmp_path: Path,
) -> None:
    directory = _timm_local_dir(tmp_path / "model", crop_mode=crop_mode, crop_pct=1.0, mean=mean)
    loaded = load_family(
        f"timm:local-dir:{directory}", cache_dir=tmp_path, offline=True, weights=""
    )
    assert loaded.card.preprocess == expected
    reference = timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=0)
    assert_parity(loaded, _timm_reference(reference), photos)


@pytest.mark.parametrize(
    ("pretrained_cfg", "message"),
    [
        ({"crop_mode": "squash", "crop_pct": 0.9}, "crop_pct 1.0"),
        ({"crop_mode": "border", "crop_pct": 0.9}, "crop_pct 1.0"),
        ({"interpolation": "nearest"}, "'nearest'"),
        ({"interpolation": "lanczos"}, "'lanczos'"),
        ({"crop_pct": 1.2}, "crop_pct 1.2"),
    ],
)
def test_timm_transforms_we_cannot_reproduce_are_refused(
    pretrained_cfg: dict[str, Any], message: str, tmp_path: Path
) -> None:
    directory = _timm_local_dir(tmp_path / "model", **pretrained_cfg)
    with pytest.raises(ConfigError, match=message):
        load_family(f"timm:local-dir:{directory}", cache_dir=tmp_path, offline=True, weights="")


def test_timm_non_square_input_is_refused(tmp_path: Path) -> None:
    _, checkpoint = _timm_checkpoint("test_resnet", tmp_path)
    directory = tmp_path / "model"
    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_resnet", pretrained=False), str(directory))
    config = json.loads((directory / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 160, 128]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="160x128 is not square"):
        load_family(f"timm:local-dir:{directory}", cache_dir=tmp_path, offline=True, weights="")
    with pytest.raises(ConfigError, match="weights cannot be given"):
        load_family(
            f"timm:local-dir:{directory}", cache_dir=tmp_path, offline=True, weights=str(checkpoint)
        )


def test_timm_unknown_name_and_uncached_weights_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot be loaded.*no_such_model") as caught:
        load_family("timm:no_such_model_xyz", cache_dir=tmp_path, offline=True, weights="")
    assert "\n" not in str(caught.value)
    # Real pretrained weights, offline, with an empty cache: never downloaded.
    with pytest.raises(ConfigError, match="not in the cache"):
        load_family("timm:resnet18.a1_in1k", cache_dir=tmp_path, offline=True, weights="")
    _, checkpoint = _timm_checkpoint("test_vit", tmp_path)
    with pytest.raises(ConfigError, match="does not fit the model"):  # another model's weights
        load_family("timm:test_resnet", cache_dir=tmp_path, offline=True, weights=str(checkpoint))


# --- open_clip --------------------------------------------------------------------------


@dataclass
class TinyClip:
    model: Any
    checkpoint: Path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> TinyClip:
    configs = tmp_path_factory.mktemp("open-clip-configs")
    (configs / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(configs)  # the registry is per process: fine for a test run
    torch.manual_seed(2)
    model = open_clip.create_model(TINY_CLIP).eval()
    checkpoint = configs / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return TinyClip(model, checkpoint)


def _open_clip_reference(model_name: str, pretrained: str | None = None) -> Reference:
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    return Reference(preprocess, model.encode_image)


def test_open_clip_card_and_parity(
    tiny_clip: TinyClip, photos: list[np.ndarray], tmp_path: Path
) -> None:
    spec = f"open_clip:{TINY_CLIP}/{tiny_clip.checkpoint}"
    loaded = load_family(spec, cache_dir=tmp_path, offline=True, weights="")
    assert loaded.card.preprocess == Preprocess(32, "crop", "bicubic", crop_pct=1.0)
    assert loaded.card.mean == pytest.approx(OPENAI_MEAN)
    assert loaded.card.std == pytest.approx(OPENAI_STD)
    assert loaded.card.output_dim == TINY_CLIP_CFG["embed_dim"]
    assert_parity(loaded, _open_clip_reference(TINY_CLIP, str(tiny_clip.checkpoint)), photos)
    # The same file as `weights`: the same model, the same id.
    again = load_family(
        f"open_clip:{TINY_CLIP}",
        cache_dir=tmp_path,
        offline=True,
        weights=str(tiny_clip.checkpoint),
    )
    assert again.model_id.rpartition("-")[2] == loaded.model_id.rpartition("-")[2]


@pytest.mark.parametrize(
    ("preprocess_cfg", "expected"),
    [
        ({"resize_mode": "longest"}, Preprocess(32, "pad", "bicubic", fill=(0, 0, 0))),
        (
            {"resize_mode": "longest", "fill_color": 200, "interpolation": "bilinear"},
            Preprocess(32, "pad", "bilinear", fill=(200, 200, 200)),
        ),
        ({"resize_mode": "squash"}, Preprocess(32, "squash", "bicubic")),
        # 'random' is for training; the eval transform uses bicubic.
        ({"interpolation": "random"}, Preprocess(32, "crop", "bicubic", crop_pct=1.0)),
    ],
)
def test_open_clip_resize_modes_from_a_local_dir(
    tiny_clip: TinyClip,
    preprocess_cfg: dict[str, Any],
    expected: Preprocess,
    photos: list[np.ndarray],
    tmp_path: Path,
) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    config = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": [0.5] * 3, **preprocess_cfg}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(tiny_clip.model.state_dict(), directory / "open_clip_pytorch_model.bin")
    loaded = load_family(
        f"open_clip:local-dir:{directory}", cache_dir=tmp_path, offline=True, weights=""
    )
    assert loaded.card.preprocess == expected
    assert loaded.card.mean == (0.5, 0.5, 0.5)
    assert_parity(loaded, _open_clip_reference(f"local-dir:{directory}"), photos)


def test_open_clip_failures_are_config_errors(tiny_clip: TinyClip, tmp_path: Path) -> None:
    def load(spec: str, weights: str = "") -> LoadedModel:
        return load_family(spec, cache_dir=tmp_path, offline=True, weights=weights)

    with pytest.raises(ConfigError, match="cannot be loaded"):
        load(f"open_clip:{TINY_CLIP}/no_such_tag")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load("open_clip:No-Such-Arch/laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match="would be random"):
        load(f"open_clip:{TINY_CLIP}")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    with pytest.raises(ConfigError, match="cannot be loaded"):  # not a random model
        load(f"open_clip:local-dir:{no_weights}")
    with pytest.raises(ConfigError, match="has its own"):
        load(f"open_clip:local-dir:{no_weights}", weights=str(tiny_clip.checkpoint))
    with pytest.raises(ConfigError, match="not both"):
        load(f"open_clip:{TINY_CLIP}/openai", weights=str(tiny_clip.checkpoint))
    # A real tag, offline, with an empty cache: never downloaded.
    with pytest.raises(ConfigError, match="not in the cache"):
        load("open_clip:ViT-B-32/laion2b_s34b_b79k")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded") as caught:
        load(f"open_clip:{TINY_CLIP}", weights=str(junk))
    assert "\n" not in str(caught.value)
