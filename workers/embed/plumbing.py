"""The plumbing CNN: random weights, no downloads, for fast tests and benchmarks of the
pipeline around the model. Its vectors find re-encodes and little else (bench/quality.py:
overall top-1 0.73 on the near-duplicate set against the default model's 1.00), so it is
never the default and its name says what it is.

Random convolutions with ReLU are a decent generic local-pattern basis; what makes or
breaks retrieval without training is the pooling head. Every image's pooled ReLU features
share a large common component, which would push all cosines towards 1, so each pooled
block is power-normalised (sqrt, to damp dominant channels) and centred per image before a
fixed signed random projection mixes the blocks into output_dim. Features come from two
depths, each as a global average and as a 2x2 layout relative to that average, so both
"what" and coarse "where" count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PLUMBING_MODEL_NAME = "plumbing-random-cnn-v1"
PLUMBING_OUTPUT_DIM = 256
_SEED = 20_240_611


class PlumbingCNN(nn.Module):
    def __init__(self, output_dim: int = PLUMBING_OUTPUT_DIM, seed: int = _SEED) -> None:
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
