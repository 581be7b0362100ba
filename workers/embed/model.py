"""Embedding models: the built-in default CNN, TorchScript and ONNX files, their model cards.

Every vector is stored with the model id that produced it, and vectors from different
models must never be mixed in one index. So the model id is derived from the weights
themselves (a hash), never from a version string someone has to remember to bump. An
exported pair (``foo.pt`` for PyTorch, ``foo.onnx`` for TensorRT) records one id in its
card, so a GPU worker running the engine and a CPU worker running PyTorch agree.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from workers.embed.model_card import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelCard,
    card_path_for,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_OUTPUT_DIM",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DefaultEmbedder",
    "LoadedModel",
    "ModelCard",
    "card_path_for",
    "default_card",
    "load_model",
    "state_dict_sha256",
]

DEFAULT_MODEL_NAME = "imgfleet-default-cnn-v1"
DEFAULT_OUTPUT_DIM = 256
_DEFAULT_SEED = 20_240_611
_MODEL_ID_HASH_HEX_CHARS = 12
_ONNX_SUFFIX = ".onnx"
_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")


class DefaultEmbedder(nn.Module):
    """A small random-weight CNN that needs no downloads and still tells images apart.

    Random convolutions with ReLU are a decent generic local-pattern basis; what makes or
    breaks retrieval without training is the pooling head. Every image's pooled ReLU
    features share a large common component, which would push all cosines towards 1, so
    each pooled block is power-normalised (sqrt, to damp dominant channels) and centred
    per image before a fixed signed random projection mixes the blocks into output_dim.
    Features come from two depths, each as a global average and as a 2x2 layout relative
    to that average, so both "what" and coarse "where" count.
    """

    def __init__(self, output_dim: int = DEFAULT_OUTPUT_DIM, seed: int = _DEFAULT_SEED) -> None:
        super().__init__()
        self.output_dim = output_dim
        # Layer constructors draw their own default initialisation from the global RNG, so
        # the fork covers construction too: building the model never perturbs the caller's
        # random stream, and the weights depend on the seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # An average pool in front (see forward) anti-aliases this strided stem, so
            # downscaled and re-encoded copies of an image land near it, and quarters its cost.
            self.conv1 = nn.Conv2d(3, 32, kernel_size=5, stride=2, padding=2, bias=False)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False)
            self.conv3 = nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1, bias=False)
            self.conv4 = nn.Conv2d(128, 256, kernel_size=3, stride=2, padding=1, bias=False)
            pooled_dim = 5 * (self.conv3.out_channels + self.conv4.out_channels)
            self.projection = nn.Linear(pooled_dim, output_dim, bias=False)
            with torch.no_grad():
                for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
                signs = torch.randint(0, 2, (output_dim, pooled_dim)).float() * 2.0 - 1.0
                self.projection.weight.copy_(signs / pooled_dim**0.5)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        mid = F.relu(self.conv3(x))
        deep = F.relu(self.conv4(mid))
        pooled = torch.cat([_describe(mid), _describe(deep)], dim=1)
        return F.normalize(self.projection(pooled), dim=1)


def _describe(features: torch.Tensor) -> torch.Tensor:
    """Centred, unit-norm global and 2x2 layout descriptors of one feature map."""
    grid = F.adaptive_avg_pool2d(features, 2).flatten(2).clamp_min(0.0).sqrt()  # N,C,4
    overall = grid.mean(dim=2)  # N,C: the whole-image summary
    overall = overall - overall.mean(dim=1, keepdim=True)
    layout = (grid - grid.mean(dim=2, keepdim=True)).flatten(1)
    return torch.cat([F.normalize(overall, dim=1), F.normalize(layout, dim=1)], dim=1)


@dataclass
class LoadedModel:
    """A model ready for an engine: a PyTorch module, an ONNX file for TensorRT, or both."""

    module: nn.Module | None
    card: ModelCard
    model_id: str
    onnx_path: Path | None = None  # for TensorRT; None: exported on demand from module

    def require_module(self) -> nn.Module:
        if self.module is None:
            raise ConfigError(
                f"model {self.model_id} is ONNX only and TensorRT cannot run here; put its "
                "TorchScript twin (same stem, .pt) next to it to run it through PyTorch"
            )
        return self.module


def default_card() -> ModelCard:
    return ModelCard(DEFAULT_MODEL_NAME, output_dim=DEFAULT_OUTPUT_DIM)


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


def load_model(path: str | os.PathLike[str] | None) -> LoadedModel:
    """None or "default": the built-in CNN; a ``.onnx`` file; otherwise TorchScript.

    Each file's card (same stem, ``.card.json``) gives input size, normalisation and output
    width. A TorchScript file's ONNX twin, and an ONNX file's TorchScript twin, are picked
    up when present, so either backend can run the model.
    """
    if path is None or str(path) == "default":
        module = DefaultEmbedder()
        model_id = f"{DEFAULT_MODEL_NAME}-{state_dict_sha256(module)[:_MODEL_ID_HASH_HEX_CHARS]}"
        return LoadedModel(module=module, card=default_card(), model_id=model_id)
    model_path = Path(path)
    if model_path.suffix == _ONNX_SUFFIX:
        return _load_onnx(model_path)
    return _load_torchscript(model_path)


def _model_id(card: ModelCard, path: Path) -> str:
    return card.model_id or f"{card.name}-{file_sha256(path)[:_MODEL_ID_HASH_HEX_CHARS]}"


def _load_torchscript(path: Path) -> LoadedModel:
    module = _read_torchscript(path)
    card_path = card_path_for(path)
    if card_path.exists():
        card = ModelCard.load(card_path)
    else:
        # No card: ImageNet conventions, and ask the model itself how wide its output is.
        card = ModelCard(path.stem, output_dim=_probe_output_dim(module, 224))
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


def _probe_output_dim(module: nn.Module, input_size: int) -> int:
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, input_size, input_size))
    if out.ndim != 2 or out.shape[0] != 1:
        raise ConfigError(f"model output has shape {tuple(out.shape)}, expected [N, dim]")
    return int(out.shape[1])
