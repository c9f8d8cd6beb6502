"""The DCGAN of the seed: a generator and a discriminator for square images of 16..128 px.

Generator: z -> one fully connected layer -> reshape to a deep, narrow 4x4 tensor -> stride-2
transposed convolutions (each doubles height/width and halves depth) with BatchNorm + ReLU on
every hidden layer -> a last transposed convolution to the image channels, tanh.

Discriminator: stride-2 convolutions with LeakyReLU(0.2), BatchNorm on all but the first, down
to 4x4 -> flatten -> one linear unit (a logit: train it with BCEWithLogitsLoss, which is the
seed's sigmoid unit made numerically safe). No pooling anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 128
START_SIDE = 4  # side of the deep, narrow tensor the generator's linear layer produces
CHANNEL_CHOICES = (1, 3)
INIT_STD = 0.02  # DCGAN (Radford et al. 2015): N(0, 0.02) weights, N(1, 0.02) BN scales
LEAKY_SLOPE = 0.2
# Noise is drawn this wide and sliced, so models with nz up to it see the same leading columns.
MAX_NZ_FOR_SHARED_NOISE = 512


def _check_shape(image_size: int, channels: int) -> None:
    """Raise ValueError unless `image_size` is a power of two in 16..128 and channels 1 or 3."""
    is_power_of_two = image_size > 0 and image_size & (image_size - 1) == 0
    if not (is_power_of_two and MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(
            f"image_size must be a power of two from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
            f"got {image_size}"
        )
    if channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _check_positive(**widths: int) -> None:
    for name, value in widths.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def num_stride2_layers(image_size: int) -> int:
    """Stride-2 layers between the 4x4 tensor and an `image_size` image (2 for 16 ... 5 for 128)."""
    return int(math.log2(image_size // START_SIDE))


class Generator(nn.Module):
    """z (N, nz) -> images (N, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, nz: int, ngf: int, image_size: int, channels: int) -> None:
        super().__init__()
        _check_positive(nz=nz, ngf=ngf)
        _check_shape(image_size, channels)
        self.nz, self.ngf, self.image_size, self.channels = nz, ngf, image_size, channels
        layers = num_stride2_layers(image_size)
        self.start_depth = ngf * 2 ** (layers - 1)
        # No biases before BatchNorm: its shift makes them redundant.
        self.project = nn.Linear(nz, self.start_depth * START_SIDE * START_SIDE, bias=False)
        blocks: list[nn.Module] = [nn.BatchNorm2d(self.start_depth), nn.ReLU(inplace=True)]
        depth = self.start_depth
        for _ in range(layers - 1):
            blocks += [
                nn.ConvTranspose2d(depth, depth // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(depth // 2),
                nn.ReLU(inplace=True),
            ]
            depth //= 2
        blocks += [nn.ConvTranspose2d(depth, channels, 4, stride=2, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # `unflatten` of the linear output (always contiguous) is a view; the convolutions
        # then follow whatever memory format (e.g. channels_last) their weights use.
        x = self.project(z).unflatten(1, (self.start_depth, START_SIDE, START_SIDE))
        return self.body(x)


class Discriminator(nn.Module):
    """images (N, channels, image_size, image_size) -> logits (N,)."""

    def __init__(self, ndf: int, image_size: int, channels: int) -> None:
        super().__init__()
        _check_positive(ndf=ndf)
        _check_shape(image_size, channels)
        self.ndf, self.image_size, self.channels = ndf, image_size, channels
        layers = num_stride2_layers(image_size)
        # The first conv has no BatchNorm (the seed), so it keeps its bias.
        blocks: list[nn.Module] = [
            nn.Conv2d(channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        depth = ndf
        for _ in range(layers - 1):
            blocks += [
                nn.Conv2d(depth, depth * 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(depth * 2),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
            depth *= 2
        self.body = nn.Sequential(*blocks)
        self.classify = nn.Linear(depth * START_SIDE * START_SIDE, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten() copies a channels_last tensor into NCHW order (view() would refuse it),
        # so the linear layer sees the same features whatever the memory format.
        return self.classify(self.body(x).flatten(1)).squeeze(1)


def init_weights(module: nn.Module) -> None:
    """DCGAN init for `module.apply`: conv/linear weights N(0, 0.02), BN weights N(1, 0.02),
    biases 0. Draws from torch's global RNG, so seed it first for reproducible weights."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to rebuild a saved generator (written to models/generator.json)."""

    nz: int
    ngf: int
    image_size: int
    channels: int

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass; a spec from JSON must hold real integers.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"generator spec: {field.name} must be an integer, got {value!r}")
        _check_positive(nz=self.nz, ngf=self.ngf)
        _check_shape(self.image_size, self.channels)

    def to_dict(self) -> dict[str, int]:
        """The spec as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorSpec:
        """Rebuild a spec from `to_dict()` output; ValueError on missing or unknown keys."""
        names = {field.name for field in fields(cls)}
        missing, unknown = names - data.keys(), data.keys() - names
        if missing or unknown:
            raise ValueError(
                f"generator spec: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
            )
        return cls(**data)


def build_generator(spec: GeneratorSpec) -> Generator:
    """A DCGAN-initialised generator for `spec` (weights drawn from torch's global RNG)."""
    generator = Generator(spec.nz, spec.ngf, spec.image_size, spec.channels)
    generator.apply(init_weights)
    return generator


def build_discriminator(ndf: int, image_size: int, channels: int) -> Discriminator:
    """A DCGAN-initialised discriminator (weights drawn from torch's global RNG)."""
    discriminator = Discriminator(ndf, image_size, channels)
    discriminator.apply(init_weights)
    return discriminator


def load_generator(
    weights_path: str | Path, spec: GeneratorSpec, map_location: str | torch.device = "cpu"
) -> Generator:
    """A generator for `spec` holding the plain state_dict saved at `weights_path`, in eval
    mode. Loads with weights_only=True; a state_dict that does not fit `spec` raises."""
    generator = Generator(spec.nz, spec.ngf, spec.image_size, spec.channels)
    state = torch.load(weights_path, map_location=map_location, weights_only=True)
    generator.load_state_dict(state)
    return generator.eval()


def latent_noise(count: int, nz: int, seed: int) -> np.ndarray:
    """(count, nz) float32 N(0, 1) noise; for a larger nz the first columns stay the same."""
    generator = torch.Generator().manual_seed(seed)
    width = max(nz, MAX_NZ_FOR_SHARED_NOISE)
    return torch.randn(count, width, generator=generator)[:, :nz].contiguous().numpy()
