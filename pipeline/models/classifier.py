"""The domain classifier: a small CNN trained on the labelled shards (the `classifier` stage).
Its penultimate embedding is the FID feature when no Inception weights are on disk (FIDs
measured with it are on their own scale, `fid_classifier`); its logits give the classifier
score and class coverage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CLASSIFIER_WIDTH = 32  # channels of the first conv block; doubled per block, capped below
CLASSIFIER_MAX_WIDTH = 256
# Two convolutions per block: with the stage's warps and 16 epochs, 99.0-99.2 % val accuracy
# on mnist5k over three seeds; one per block stayed at 98.2-98.6 % (BENCHMARKS.md, section 5).
CLASSIFIER_CONVS_PER_BLOCK = 2
CLASSIFIER_FEATURE_DIM = 128
CLASSIFIER_END_SIDE = 4  # conv blocks halve the side down to 4x4


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild the classifier (saved in models/classifier/spec.json)."""

    image_size: int
    channels: int
    num_classes: int
    width: int = CLASSIFIER_WIDTH
    feature_dim: int = CLASSIFIER_FEATURE_DIM
    convs_per_block: int = CLASSIFIER_CONVS_PER_BLOCK

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierSpec:
        """Rebuild from `asdict` output (unknown keys are an error)."""
        return cls(**values)


class DomainClassifier(nn.Module):
    """Blocks of `convs_per_block` x Conv(3x3)-BN-ReLU and a MaxPool down to 4x4, then a
    `feature_dim` embedding and a linear head. `forward` returns the embedding (the FID
    feature); `logits` the class scores."""

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_features = spec.feature_dim
        blocks: list[nn.Module] = []
        channels_in, width = spec.channels, spec.width
        for _ in range(int(math.log2(spec.image_size // CLASSIFIER_END_SIDE))):
            for _ in range(spec.convs_per_block):
                blocks += [
                    nn.Conv2d(channels_in, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels_in = width
            blocks.append(nn.MaxPool2d(2))
            width = min(width * 2, CLASSIFIER_MAX_WIDTH)
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.embed = nn.Sequential(
            nn.Linear(channels_in * CLASSIFIER_END_SIDE**2, spec.feature_dim), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(spec.feature_dim, spec.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes)."""
        return self.head(self(images))
