"""The model card: what a model expects as input and produces, stored as JSON next to it.

``models/foo.pt``, ``models/foo.onnx`` and ``models/foo.card.json`` share one stem, so a
TorchScript file and its ONNX export (what TensorRT builds from) share one card.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.files import write_atomic
from workers.decode.preprocess import Preprocess

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

CARD_SUFFIX = ".card.json"


@dataclass(frozen=True)
class ModelCard:
    """Input pixels (``preprocess``), normalisation and output width of one model.

    ``preprocess`` is derived from the model library's own transform config where the
    model has one (timm's pretrained_cfg, open_clip's preprocess_cfg, a Hugging Face image
    processor); the decoders honour it. ``preferred_batch_sizes`` are the batch sizes the
    model runs best at (an engine's optimisation profiles, a compiled graph's shapes);
    empty means any size is fine.
    """

    name: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output_dim: int = field(kw_only=True)
    preferred_batch_sizes: tuple[int, ...] = field(default=(), kw_only=True)
    # Set by the exporter so a TorchScript file and its ONNX twin record the same id; empty:
    # the id is the name plus a hash of the model file.
    model_id: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model card: name is empty")
        if self.output_dim <= 0:
            raise ConfigError("model card: output_dim must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("model card: mean and std need 3 values, std positive")
        if any(size <= 0 for size in self.preferred_batch_sizes):
            raise ConfigError("model card: preferred_batch_sizes must be positive")

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["preprocess"] = self.preprocess.to_dict()
        raw["input_size"] = self.input_size  # read by older cards' consumers
        raw["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        try:
            # A card without "preprocess" (written before it existed) means the old fixed
            # definition at its input size: shorter side, centre crop, bilinear.
            preprocess_raw = raw.get("preprocess") or {"size": raw.get("input_size", 224)}
            return cls(
                name=str(raw["name"]),
                preprocess=Preprocess.from_dict(dict(preprocess_raw)),
                mean=_triple(raw.get("mean", IMAGENET_MEAN)),
                std=_triple(raw.get("std", IMAGENET_STD)),
                output_dim=int(raw["output_dim"]),
                preferred_batch_sizes=tuple(
                    sorted({int(v) for v in raw.get("preferred_batch_sizes", ())})
                ),
                model_id=str(raw.get("model_id", "")),
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
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def card_path_for(model_path: str | os.PathLike[str]) -> Path:
    """`models/foo.pt` (or `.onnx`) -> `models/foo.card.json`."""
    return Path(model_path).with_suffix(CARD_SUFFIX)


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
