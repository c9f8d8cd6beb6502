"""An exponential moving average of the generator's weights (StyleGAN2-ADA's `G_ema`).

The average is what evaluate, register and sample use: a GAN's weights oscillate around a
good generator, and their average draws better samples than the last step's weights.

The decay per step follows StyleGAN2-ADA: the average's half-life is `half_life_images`
(`train.ema_half_life_images`), ramped up as `EMA_RAMPUP` x images seen early in training, so
the average does not drag the untrained start along. BatchNorm statistics are not averaged:
the average's own statistics are measured (`refresh_batchnorm`) on a fixed noise batch, since
running statistics collected for the raw weights do not fit averaged ones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_RAMPUP = 0.05  # StyleGAN2-ADA's ema_rampup: half-life <= 5 % of the images seen so far


class GeneratorEma:
    """The averaged copy of a generator, updated after every step (one rank keeps it)."""

    def __init__(self, generator: nn.Module, half_life_images: int, global_batch: int) -> None:
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.half_life_images = half_life_images
        self.global_batch = global_batch

    def decay(self, images_seen: int) -> float:
        """The weight the average keeps per step once `images_seen` images were trained on."""
        half_life = min(float(self.half_life_images), images_seen * EMA_RAMPUP)
        return 0.5 ** (self.global_batch / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, generator: nn.Module, images_seen: int) -> None:
        """Move the average towards `generator`'s current weights (same parameter order)."""
        averaged = list(self.model.parameters())
        current = [param.detach() for param in generator.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay(images_seen))

    @torch.no_grad()
    def refresh_batchnorm(self, noise: torch.Tensor) -> torch.Tensor:
        """Measure the average's BatchNorm statistics on `noise` (one batch, exact mean and
        variance) and return the images drawn with them, in [-1, 1]."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: after one batch, that batch's stats
        self.model.train()
        try:
            images = self.model(noise).float().clamp(-1, 1)
        finally:
            self.model.eval()
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
        return images

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average's weights and statistics on the CPU (the checkpoint's `generator_ema`)."""
        return {key: value.cpu() for key, value in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a saved average (resume)."""
        self.model.load_state_dict(state)
