"""`python -m tests.unit.imgfleet.tiny_model_cli ARGS`: the imgfleet command line with a
tiny model (each image's mean colour, 3 dimensions) in place of the default one, so that
`search --image` runs its whole path (fetch, decode, embed, search) in a second.
"""

from __future__ import annotations

import torch
from torch import nn

import imgfleet.factories as factories
from common.config import Settings
from imgfleet.cli import main
from workers.embed.embedder import ModelEmbedder
from workers.embed.model import LoadedModel
from workers.embed.model_card import ModelCard

TINY_DIM = 3


class MeanColour(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def tiny_embedder(settings: Settings) -> ModelEmbedder:
    card = ModelCard("mean-colour", output_dim=TINY_DIM)
    return ModelEmbedder(LoadedModel(MeanColour(), card, "mean-colour-1"), threads=1)


if __name__ == "__main__":
    factories.make_embedder = tiny_embedder
    raise SystemExit(main())
