"""Embedding models: the built-in default CNN, TorchScript files, and their model cards.

Every vector is stored with the model id that produced it, and vectors from different
models must never be mixed in one index. So the model id is derived from the weights
themselves (a hash), never from a version string someone has to remember to bump.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_MODEL_NAME = "imgfleet-default-cnn-v1"
DEFAULT_OUTPUT_DIM = 256
_DEFAULT_SEED = 20_240_611
_MODEL_ID_HASH_HEX_CHARS = 12
_CARD_SUFFIX = ".card.json"


@dataclass(frozen=True)
class ModelCard:
    """What a model expects as input and produces; stored as JSON next to the model file."""

    name: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output_dim: int = field(kw_only=True)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model card: name is empty")
        if self.input_size <= 0 or self.output_dim <= 0:
            raise ConfigError("model card: input_size and output_dim must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("model card: mean and std need 3 values, std positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        try:
            return cls(
                name=str(raw["name"]),
                input_size=int(raw.get("input_size", 224)),
                mean=_triple(raw.get("mean", IMAGENET_MEAN)),
                std=_triple(raw.get("std", IMAGENET_STD)),
                output_dim=int(raw["output_dim"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"model card is invalid: {exc!r}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read model card {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"model card {path} is not a JSON object")
        return cls.from_dict(raw)

    def save(self, path: str | os.PathLike[str]) -> None:
        _atomic_write(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def card_path_for(model_path: str | os.PathLike[str]) -> Path:
    """`models/foo.pt` -> `models/foo.card.json`."""
    return Path(model_path).with_suffix(_CARD_SUFFIX)


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _atomic_write(path: Path, data: bytes) -> None:
    # A reader must never see half a file: write aside, then rename over.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


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
    module: nn.Module
    card: ModelCard
    model_id: str


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


def load_model(path: str | None) -> LoadedModel:
    """None or "default": the built-in CNN; otherwise a TorchScript file (and its card)."""
    if path is None or path == "default":
        module = DefaultEmbedder()
        model_id = f"{DEFAULT_MODEL_NAME}-{state_dict_sha256(module)[:_MODEL_ID_HASH_HEX_CHARS]}"
        return LoadedModel(module=module, card=default_card(), model_id=model_id)
    return _load_torchscript(Path(path))


def _load_torchscript(path: Path) -> LoadedModel:
    try:
        file_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc}") from exc
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but still the format deployments ship.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a loadable TorchScript model: {exc}") from exc
    module.eval()
    card_path = card_path_for(path)
    if card_path.exists():
        card = ModelCard.load(card_path)
    else:
        # No card: ImageNet conventions, and ask the model itself how wide its output is.
        card = ModelCard(path.stem, output_dim=_probe_output_dim(module, 224))
    file_hash = hashlib.sha256(file_bytes).hexdigest()[:_MODEL_ID_HASH_HEX_CHARS]
    return LoadedModel(module=module, card=card, model_id=f"{card.name}-{file_hash}")


def _probe_output_dim(module: nn.Module, input_size: int) -> int:
    with torch.inference_mode():
        out = module(torch.zeros(1, 3, input_size, input_size))
    if out.ndim != 2 or out.shape[0] != 1:
        raise ConfigError(f"model output has shape {tuple(out.shape)}, expected [N, dim]")
    return int(out.shape[1])


def save_default_as_torchscript(
    path: str | os.PathLike[str], *, name: str = "default-cnn-v1-torchscript"
) -> ModelCard:
    """Script the default model to path and write its card next to it; returns the card."""
    target = Path(path)
    module = DefaultEmbedder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(target))
    card = ModelCard(name, output_dim=module.output_dim)
    card.save(card_path_for(target))
    return card
