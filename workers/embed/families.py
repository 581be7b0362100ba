"""timm, open_clip and Hugging Face models by name, with the card their library states.

``load_family(spec)`` takes ``timm:NAME``, ``open_clip:ARCH/PRETRAINED`` or
``hf:REPO_OR_DIR`` (``workers.embed.model.load_model`` routes those prefixes here). The
model card is never typed in by hand: it is derived from the library's own eval-transform
config (timm's ``resolve_data_config``, open_clip's ``preprocess_cfg``, a Hugging Face image
processor), and a config our decoder cannot reproduce pixel for pixel is refused with a
``ConfigError`` rather than approximated: vectors from slightly wrong pixels look fine and
search worse.

The module returned takes float32 NCHW already normalised by the card's mean/std and
returns [N, D] image embeddings: timm's pooled features (``num_classes=0``), open_clip's
``encode_image``, and for Hugging Face the image tower's own head (CLIP ``image_embeds``,
SigLIP / DINOv2 / ViT ``pooler_output``, else the mean of ``last_hidden_state``).

The libraries are imported only here and only when asked for: the main environment has
neither timm nor open_clip (they need torchvision; ``scripts/setup-vision.sh``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from torch import nn

from common.errors import ConfigError
from workers.decode.preprocess import Interpolation, Preprocess
from workers.embed.model import LoadedModel, card_hash, probe_output_dim, state_dict_sha256
from workers.embed.model_card import ModelCard

__all__ = ["load_family"]

Triple = tuple[float, float, float]
Loader = Callable[[str, str, Path, bool, str], tuple[nn.Module, Preprocess, Triple, Triple]]

_VISION_EXTRA = "pip install 'imgfleet[vision]' (needs torchvision)"
_HF_EXTRA = "pip install 'imgfleet[hf]'"
_SPEC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_MESSAGE_CHARS = 300
# PIL's resampling filters by number, as Hugging Face processors store them (``resample``).
_PIL_FILTER_NAMES = {
    0: "nearest",
    1: "lanczos",
    2: "bilinear",
    3: "bicubic",
    4: "box",
    5: "hamming",
}
# Exceptions that mean "offline and not downloaded yet" (huggingface_hub's names; matched by
# name so that a missing huggingface_hub does not break the check itself).
_NOT_CACHED_ERRORS = frozenset({"LocalEntryNotFoundError", "OfflineModeIsEnabled"})
_NOT_CACHED_PHRASES = ("local_files_only", "offline mode", "cached files", "hf_hub_offline")
# Prefixes with which timm and open_clip name a model by its config's location; what follows
# is not split into architecture and pretrained tag.
_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")
# Hugging Face architectures (config.json's) loaded as their image tower alone: the class
# that loads it (a CLIPModel checkpoint holds a text tower too) and the output field that is
# the image embedding (get_image_features's). Others load with AutoModel.
_HF_TOWERS: dict[str, tuple[str, str]] = {
    "CLIPModel": ("CLIPVisionModelWithProjection", "image_embeds"),
    "CLIPVisionModelWithProjection": ("CLIPVisionModelWithProjection", "image_embeds"),
    "CLIPVisionModel": ("CLIPVisionModel", "pooler_output"),
    "SiglipModel": ("SiglipVisionModel", "pooler_output"),
    "SiglipVisionModel": ("SiglipVisionModel", "pooler_output"),
}
_MEAN_HEAD = "mean"  # the mean of last_hidden_state over tokens (or spatial positions)
# ConvNeXt processors below this shortest edge resize to shortest_edge / crop_pct and crop;
# at or above it they squash (transformers' ConvNextImageProcessor).
_CONVNEXT_CROP_BELOW = 384


def load_family(spec: str, *, cache_dir: Path, offline: bool, weights: str) -> LoadedModel:
    """The model ``spec`` names, its card derived from its library's transform config.

    ``weights``: empty for the library's pretrained weights (downloaded under ``cache_dir``
    unless ``offline``), else a local checkpoint file loaded into the model instead.
    """
    family, sep, name = spec.partition(":")
    loaders: dict[str, Loader] = {"timm": _load_timm, "open_clip": _load_open_clip, "hf": _load_hf}
    loader = loaders.get(family)
    if not sep or loader is None or not name.strip():
        raise ConfigError(
            f"model {spec!r}: expected timm:NAME, open_clip:ARCH/PRETRAINED or hf:REPO_OR_DIR"
        )
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model {spec}: weights file {weights} does not exist")
    if offline:
        _go_offline()
    try:
        module, preprocess, mean, std = loader(spec, name.strip(), cache_dir, offline, weights)
        module.eval()
        module.requires_grad_(False)
        output_dim = probe_output_dim(module, preprocess.size)
    except ConfigError:
        raise
    except Exception as exc:  # a library's failure, reported in one line (start-up only)
        if offline and _not_cached(exc):
            raise ConfigError(
                f"model {spec} is not in the cache ({cache_dir}) and offline is set: "
                "run once with model.offline = false to download it"
            ) from exc
        raise ConfigError(f"model {spec} cannot be loaded: {_one_line(exc)}") from exc
    card = ModelCard(spec, preprocess=preprocess, mean=mean, std=std, output_dim=output_dim)
    # The weights' hash and the card: same weights, other pixels would be another space.
    model_id = f"{_SPEC_UNSAFE.sub('-', spec)}-{card_hash(card, state_dict_sha256(module))}"
    return LoadedModel(module, card, model_id, onnx_on_cpu=False)


# --- timm -----------------------------------------------------------------------------


class _TimmTower(nn.Module):
    """A timm model created with ``num_classes=0``: its forward gives pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model(x))


def _load_timm(
    spec: str, name: str, cache_dir: Path, offline: bool, weights: str
) -> tuple[nn.Module, Preprocess, Triple, Triple]:
    timm = _import_vision(spec, "timm")
    from timm.data import resolve_data_config

    if weights and name.startswith(_SOURCE_PREFIXES):
        # timm would load that location's weights and silently ignore the file.
        raise ConfigError(f"model {spec}: weights cannot be given; {name} has its own")
    if offline and not weights:
        _check_timm_url_cached(spec, name, cache_dir)
    # num_classes=0: forward gives the pooled features, the classifier is never built.
    model = timm.create_model(name, pretrained=not weights, num_classes=0, cache_dir=str(cache_dir))
    if weights:
        _load_timm_checkpoint(spec, timm, model, weights)
    data_cfg = resolve_data_config({}, model=model)
    mean, std = _triple(spec, "mean", data_cfg["mean"]), _triple(spec, "std", data_cfg["std"])
    return _TimmTower(model), _timm_preprocess(spec, data_cfg), mean, std


def _load_timm_checkpoint(spec: str, timm: Any, model: Any, weights: str) -> None:
    # Not timm's pretrained=True file load: with num_classes=0 it loads non-strictly and
    # only logs the tensors it left random (another architecture's file loads "fine").
    state = timm.models.load_state_dict(weights)  # safetensors or torch, wrapped or not
    classifiers = model.pretrained_cfg.get("classifier") or ()
    heads = {classifiers} if isinstance(classifiers, str) else set(classifiers)
    state = {k: v for k, v in state.items() if k.rpartition(".")[0] not in heads}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        keys = [*result.missing_keys, *result.unexpected_keys]
        raise ConfigError(
            f"model {spec}: weights file {weights} does not fit the model "
            f"({len(result.missing_keys)} tensors missing, {len(result.unexpected_keys)} "
            f"unexpected, e.g. {', '.join(keys[:3])})"
        )


def _check_timm_url_cached(spec: str, name: str, cache_dir: Path) -> None:
    # Weights only at a URL (no Hugging Face hub id) would be fetched by torch.hub, which
    # knows no offline mode: refuse unless torch.hub's file is already in cache_dir.
    if name.startswith(_SOURCE_PREFIXES):
        return
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.hf_hub_id or cfg.file or not cfg.url:
        return
    if not (cache_dir / os.path.basename(urlparse(cfg.url).path)).is_file():
        raise ConfigError(
            f"model {spec} is not in the cache ({cache_dir}) and offline is set: "
            "run once with model.offline = false to download it"
        )


def _timm_preprocess(spec: str, cfg: Mapping[str, Any]) -> Preprocess:
    """timm's eval transform (``transforms_imagenet_eval``) as our Preprocess."""
    size = _square_size(spec, tuple(cfg["input_size"])[-2:])
    interpolation = _interpolation(spec, cfg.get("interpolation", "bilinear"))
    # timm's own defaults when the pretrained cfg leaves them out.
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_pct > 1.0:
        # Resizing below the input size, then padding by a centre crop: not expressible.
        raise ConfigError(f"model {spec}: crop_pct {crop_pct} > 1 is not supported")
    if crop_mode == "center":
        return Preprocess(size, "crop", interpolation, crop_pct=crop_pct)
    if crop_pct < 1.0:
        raise ConfigError(
            f"model {spec}: crop_mode {crop_mode!r} with crop_pct {crop_pct} (resize, then "
            "crop) is not supported; only crop_pct 1.0 is"
        )
    if crop_mode == "squash":
        return Preprocess(size, "squash", interpolation)
    if crop_mode == "border":
        # Longest side to size, centred on a canvas of the mean colour, as timm fills it.
        r, g, b = (round(255 * v) for v in cfg["mean"])
        return Preprocess(size, "pad", interpolation, fill=(r, g, b))
    raise ConfigError(f"model {spec}: timm crop_mode {crop_mode!r} is not supported")


# --- open_clip --------------------------------------------------------------------------


class _OpenClipTower(nn.Module):
    """An open_clip model's image side: ``encode_image``, not normalised (the engine does)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.encode_image(x))


def _load_open_clip(
    spec: str, name: str, cache_dir: Path, offline: bool, weights: str
) -> tuple[nn.Module, Preprocess, Triple, Triple]:
    open_clip = _import_vision(spec, "open_clip")
    if name.startswith(_SOURCE_PREFIXES):
        arch, pretrained = name, ""  # config and weights come from that location
        if weights:
            raise ConfigError(f"model {spec}: weights cannot be given; {name} has its own")
    else:
        arch, _, pretrained = name.partition("/")
        if weights and pretrained:
            raise ConfigError(f"model {spec}: give either a pretrained tag or weights, not both")
        pretrained = pretrained or weights
        if not pretrained:
            raise ConfigError(
                f"model {spec}: name the weights, open_clip:{arch}/TAG (or /FILE), or give a "
                "weights file; without them the model would be random"
            )
        if offline:
            _check_open_clip_url_cached(spec, open_clip, arch, pretrained, cache_dir)
    # require_pretrained: open_clip only logs a warning when it falls back to random weights
    # (a hub or local-dir config found without its checkpoint).
    model, _, _ = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained or None, cache_dir=str(cache_dir), require_pretrained=True
    )
    cfg = dict(model.visual.preprocess_cfg)
    mean, std = _triple(spec, "mean", cfg["mean"]), _triple(spec, "std", cfg["std"])
    return _OpenClipTower(model), _open_clip_preprocess(spec, cfg), mean, std


def _check_open_clip_url_cached(
    spec: str, open_clip: Any, arch: str, tag: str, cache_dir: Path
) -> None:
    # As for timm: a tag whose weights are only at a URL is fetched with urllib.
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg or cfg.get("hf_hub") or cfg.get("file") or not cfg.get("url"):
        return
    if not (cache_dir / os.path.basename(urlparse(cfg["url"]).path)).is_file():
        raise ConfigError(
            f"model {spec} is not in the cache ({cache_dir}) and offline is set: "
            "run once with model.offline = false to download it"
        )


def _open_clip_preprocess(spec: str, cfg: Mapping[str, Any]) -> Preprocess:
    """open_clip's eval transform (``image_transform_v2``) as our Preprocess."""
    raw_size = cfg["size"]
    size = _square_size(spec, (raw_size, raw_size) if isinstance(raw_size, int) else raw_size)
    raw_interpolation = cfg.get("interpolation") or "bicubic"
    # 'random' is a training choice; open_clip's eval transform then uses bicubic.
    if raw_interpolation == "random":
        raw_interpolation = "bicubic"
    interpolation = _interpolation(spec, raw_interpolation)
    resize_mode = cfg.get("resize_mode") or "shortest"
    if resize_mode == "shortest":
        return Preprocess(size, "crop", interpolation, crop_pct=1.0)
    if resize_mode == "squash":
        return Preprocess(size, "squash", interpolation)
    if resize_mode == "longest":
        fill = int(cfg.get("fill_color") or 0)
        return Preprocess(size, "pad", interpolation, fill=(fill, fill, fill))
    raise ConfigError(f"model {spec}: open_clip resize_mode {resize_mode!r} is not supported")


# --- Hugging Face transformers -----------------------------------------------------------


class _HfTower(nn.Module):
    """A transformers vision model and the output field that is its image embedding."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, return_dict=True)
        if self.head == _MEAN_HEAD:
            hidden = out["last_hidden_state"]
            # Tokens [N, T, D], or a CNN's feature map [N, C, H, W].
            return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)
        return cast(torch.Tensor, out[self.head]).flatten(1)  # ResNet pools to [N, C, 1, 1]


def _load_hf(
    spec: str, name: str, cache_dir: Path, offline: bool, weights: str
) -> tuple[nn.Module, Preprocess, Triple, Triple]:
    source = _hf_source(spec, name)
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(f"model {spec} needs transformers: {_HF_EXTRA}") from exc

    hub: dict[str, Any] = {"cache_dir": str(cache_dir), "local_files_only": offline}
    config = transformers.AutoConfig.from_pretrained(source, **hub)
    processor = transformers.AutoImageProcessor.from_pretrained(
        source, **hub, **_pil_backend(transformers.__version__)
    )
    preprocess, mean, std = _hf_preprocess(spec, processor)
    architectures = list(getattr(config, "architectures", None) or [])
    class_name, head = _HF_TOWERS.get(architectures[0] if architectures else "", ("AutoModel", ""))
    model_class = getattr(transformers, class_name)
    model_config = _hf_model_config(model_class, config)
    if weights:
        model = _hf_from_file(spec, model_class, model_config, weights)
    else:
        model, info = model_class.from_pretrained(
            source, config=model_config, **hub, output_loading_info=True
        )
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            head = _hf_head_without(spec, head, missing)
    return _HfTower(model, head or _hf_probe_head(model, preprocess.size)), preprocess, mean, std


def _hf_source(spec: str, name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model {spec}: {name} is not a directory (save_pretrained's)")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError(f"model {spec}: directory {name} does not exist")
    return name  # a hub repo id


def _pil_backend(version: str) -> dict[str, Any]:
    # The slow (PIL) processor: the one whose resize is Pillow's, as ours is. transformers 5
    # names it backend="pil" and deprecates use_fast.
    major = int(version.split(".", 1)[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


def _hf_model_config(model_class: Any, config: Any) -> Any:
    """The config ``model_class`` is built from: a two-tower model's vision_config for its
    image tower (CLIPModel, SiglipModel), with the projection width the pair shares."""
    tower = getattr(config, "vision_config", None)
    if tower is None or model_class.__name__ == "AutoModel":
        return config
    if getattr(config, "projection_dim", None) is not None:
        # CLIPModel keeps it at the top; a vision_config's own value may be a default.
        tower.projection_dim = config.projection_dim
    return tower


def _hf_from_file(spec: str, model_class: Any, config: Any, weights: str) -> nn.Module:
    if model_class.__name__ == "AutoModel":
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    state = _read_state_dict(spec, weights)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix != "." and not any(k in model.state_dict() for k in state):
        # A task model's checkpoint (vit.encoder...) into its base model (encoder...).
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ConfigError(
            f"model {spec}: weights file {weights} lacks {len(result.missing_keys)} of the "
            f"model's tensors, e.g. {', '.join(result.missing_keys[:3])}"
        )
    return cast(nn.Module, model)


def _hf_head_without(spec: str, head: str, missing: list[str]) -> str:
    """The head to use when the checkpoint lacks ``missing`` tensors (random in the model).

    A task model's checkpoint (ViTForImageClassification) loaded as its base model has no
    pooler: take the mean of last_hidden_state instead of a randomly initialised pooler.
    Anything else missing would give meaningless vectors.
    """
    if not head and all(key.split(".", 1)[0] == "pooler" for key in missing):
        return _MEAN_HEAD
    raise ConfigError(
        f"model {spec}: the checkpoint lacks {len(missing)} of the model's tensors, e.g. "
        f"{', '.join(missing[:3])}; random weights would give meaningless vectors"
    )


def _hf_probe_head(model: nn.Module, size: int) -> str:
    model.eval()
    with torch.inference_mode():
        out = model(pixel_values=torch.zeros(1, 3, size, size), return_dict=True)
    return "pooler_output" if out.get("pooler_output") is not None else _MEAN_HEAD


def _hf_preprocess(spec: str, proc: Any) -> tuple[Preprocess, Triple, Triple]:
    """A Hugging Face image processor's resize, crop and normalisation as our card's."""
    kind = type(proc).__name__
    if getattr(proc, "do_pad", None):
        raise ConfigError(f"model {spec}: {kind} pads its inputs (do_pad), not supported")
    if not getattr(proc, "do_resize", True):
        raise ConfigError(f"model {spec}: {kind} does not resize (do_resize false)")
    size = getattr(proc, "size", None)
    shortest = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    interpolation = _interpolation(spec, getattr(proc, "resample", 2))
    crop_pct = getattr(proc, "crop_pct", None)
    other = [k for k in ("longest_edge", "max_height", "max_width") if _size_field(size, k)]
    if other:
        raise ConfigError(f"model {spec}: {kind} size {other[0]} is not supported")
    if crop_pct is not None:
        if not kind.startswith("ConvNext") or not shortest:
            raise ConfigError(f"model {spec}: {kind} with crop_pct is not supported")
        if shortest >= _CONVNEXT_CROP_BELOW:
            preprocess = Preprocess(shortest, "squash", interpolation)
        else:
            scale = int(shortest / float(crop_pct))
            preprocess = Preprocess(
                shortest,
                "crop",
                interpolation,
                crop_pct=_crop_pct(shortest, scale),
                crop_offset="floor",  # transformers' centre crop floors the offset
            )
    elif shortest and not (height or width):
        if not getattr(proc, "do_center_crop", False):
            raise ConfigError(
                f"model {spec}: {kind} resizes the shortest edge without a centre crop, so "
                "its input is not square; only square inputs are supported"
            )
        crop = getattr(proc, "crop_size", None)
        crop_h, crop_w = _size_field(crop, "height"), _size_field(crop, "width")
        crop_side = _square_size(spec, (crop_h, crop_w))
        if crop_side > shortest:
            raise ConfigError(
                f"model {spec}: {kind} crops {crop_side} px from a {shortest} px edge "
                "(it would pad), not supported"
            )
        preprocess = Preprocess(
            crop_side,
            "crop",
            interpolation,
            crop_pct=_crop_pct(crop_side, shortest),
            crop_offset="floor",  # transformers' centre crop floors the offset
        )
    elif height and width and not shortest:
        side = _square_size(spec, (height, width))
        if getattr(proc, "do_center_crop", False):
            crop = getattr(proc, "crop_size", None)
            if (_size_field(crop, "height"), _size_field(crop, "width")) != (side, side):
                raise ConfigError(
                    f"model {spec}: {kind} squashes to {side} px and then crops: not supported"
                )
        preprocess = Preprocess(side, "squash", interpolation)
    else:
        raise ConfigError(f"model {spec}: {kind} size {size!r} is not supported")
    mean, std = _hf_normalisation(spec, proc)
    return preprocess, mean, std


def _hf_normalisation(spec: str, proc: Any) -> tuple[Triple, Triple]:
    # The processor computes (pixel * rescale - mean) / std; the engine (pixel / 255 - m) / s.
    # The same map with m = mean / (255 * rescale) and s = std / (255 * rescale).
    rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
    if rescale <= 0:
        raise ConfigError(f"model {spec}: rescale_factor {rescale} is not positive")
    if getattr(proc, "do_normalize", True):
        mean = _triple(spec, "image_mean", proc.image_mean)
        std = _triple(spec, "image_std", proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    scale = 255.0 * rescale
    if math.isclose(scale, 1.0, rel_tol=1e-9):
        return mean, std  # the usual 1/255: keep the processor's numbers as they are
    m = tuple(v / scale for v in mean)
    s = tuple(v / scale for v in std)
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def _size_field(size: Any, key: str) -> int:
    """One field of a processor's size: a dict (transformers 4), SizeDict (5) or an int."""
    if size is None:
        return 0
    if isinstance(size, int):
        return size if key in ("height", "width") else 0
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value or 0)


def _crop_pct(size: int, scale_size: int) -> float:
    """The crop_pct whose ``floor(size / crop_pct)`` is exactly ``scale_size``.

    ``size / scale_size`` itself can land a rounding error below: 32 / (32 / 40) may be
    39.999..., which Preprocess would floor to 39.
    """
    pct = size / scale_size
    while math.floor(size / pct) < scale_size:
        pct = math.nextafter(pct, 0.0)
    while math.floor(size / pct) > scale_size:
        pct = math.nextafter(pct, 1.0)
    return min(pct, 1.0)


# --- shared -----------------------------------------------------------------------------


def _import_vision(spec: str, module_name: str) -> Any:
    try:
        return __import__(module_name)
    except (ImportError, RuntimeError, OSError) as exc:
        # RuntimeError / OSError: torchvision built for another torch fails while importing.
        raise ConfigError(
            f"model {spec} needs {module_name}: {_VISION_EXTRA} ({_one_line(exc)})"
        ) from exc


def _go_offline() -> None:
    # Read by huggingface_hub (and so transformers, timm, open_clip) when first imported;
    # if it already was, flip its flag too, which it checks on every request.
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        vars(constants)["HF_HUB_OFFLINE"] = True


def _not_cached(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _NOT_CACHED_ERRORS:
            return True
        text = str(current).lower()
        if any(phrase in text for phrase in _NOT_CACHED_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


def _read_state_dict(spec: str, path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: one line, not a traceback
        raise ConfigError(f"model {spec}: cannot read weights {path}: {_one_line(exc)}") from exc
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model {spec}: weights {path} is not a state dict of tensors")
    return state


def _interpolation(spec: str, value: Any) -> Interpolation:
    # A PIL filter number or enum, a torchvision InterpolationMode, or a name.
    raw = getattr(value, "value", value)
    name = _PIL_FILTER_NAMES.get(raw, str(raw)) if isinstance(raw, int) else str(raw).lower()
    if name in ("bilinear", "bicubic"):
        return cast(Interpolation, name)
    # No other filter maps onto these two without changing the pixels.
    raise ConfigError(
        f"model {spec}: interpolation {name!r} is not supported (bilinear or bicubic only)"
    )


def _square_size(spec: str, size: Any) -> int:
    height, width = (int(v) for v in size)
    if height != width or height <= 0:
        raise ConfigError(
            f"model {spec}: input {height}x{width} is not square; only square inputs are supported"
        )
    return height


def _triple(spec: str, what: str, values: Any) -> Triple:
    if isinstance(values, int | float):
        values = (values,) * 3
    numbers = [float(v) for v in values]
    if len(numbers) != 3:
        raise ConfigError(f"model {spec}: {what} has {len(numbers)} channels, expected RGB (3)")
    return numbers[0], numbers[1], numbers[2]


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."
