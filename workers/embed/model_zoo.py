"""Reference architectures built in the project, for benchmarks where no weights are at hand.

``vit_b16`` has ViT-B/16's shape (patch 16, width 768, depth 12, 12 heads, MLP 3072) and
random weights: its vectors mean nothing, but its cost per image is what a real CLIP or
DINO ViT-B/16 image tower costs, which is what GPU throughput figures need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.embed.model import LoadedModel
from workers.embed.model_card import ModelCard


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        output_dim: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
            patches = (image_size // patch_size) ** 2
            self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.position = nn.Parameter(torch.randn(1, patches + 1, width) * 0.02)
            layer = nn.TransformerEncoderLayer(
                width,
                heads,
                mlp_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, output_dim, bias=False)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position
        encoded = self.norm(self.encoder(tokens))
        return F.normalize(self.head(encoded[:, 0]), dim=1)


def vit_b16(output_dim: int = 512) -> LoadedModel:
    module = VisionTransformer(output_dim=output_dim)
    card = ModelCard(
        "vit-b16-random",
        mean=(0.48145466, 0.4578275, 0.40821073),  # CLIP's normalisation
        std=(0.26862954, 0.26130258, 0.27577711),
        output_dim=output_dim,
    )
    return LoadedModel(module=module, card=card, model_id="vit-b16-random-seed0")
