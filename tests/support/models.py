"""Model files for tests: the plumbing CNN saved as TorchScript, with its card."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from workers.embed.model_card import ModelCard, card_path_for
from workers.embed.plumbing import PlumbingCNN


def save_plumbing_as_torchscript(
    path: str | os.PathLike[str], *, name: str = "plumbing-cnn-v1-torchscript"
) -> ModelCard:
    """Script the plumbing CNN to path and write its card next to it; returns the card."""
    target = Path(path)
    module = PlumbingCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(target))
    card = ModelCard(name, output_dim=module.output_dim)
    card.save(card_path_for(target))
    return card
