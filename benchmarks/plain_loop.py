"""The reference: a plain, single-process PyTorch DCGAN loop, as one would write it by hand.

Same models (pipeline.models), same init, same optimiser settings and the same maths per step
as the product's `training.TrainLoop.train_step` (D on real and fake with one backward, G with
D's weights frozen), and nothing else: no Ray, no DDP wrapper, no metrics, no checkpoints, no
grids, no host sync. What the product costs beyond this is its machinery.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pipeline.core.config import Config
from pipeline.models.dcgan import GeneratorSpec, build_discriminator, build_generator


class PlainDCGAN:
    """Models + optimisers; `step(real, noise)` is one DCGAN update."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", *,
                 channels_last: bool = False, wrap: Any = None, graph_safe: bool = False) -> None:
        """`graph_safe`: fused, capturable Adam and no autocast cast cache, so that `step` can
        be recorded as one CUDA graph (`pipeline.train.captured.capture`); CUDA only."""
        torch.manual_seed(cfg.train.seed)
        device = torch.device(device)
        spec = GeneratorSpec(cfg.model.nz, cfg.model.ngf, cfg.data.image_size, cfg.data.channels)
        generator = build_generator(spec).to(device)
        discriminator = build_discriminator(
            cfg.model.ndf, cfg.data.image_size, cfg.data.channels
        ).to(device)
        if channels_last:
            generator = generator.to(memory_format=torch.channels_last)
            discriminator = discriminator.to(memory_format=torch.channels_last)
        # `wrap`: e.g. DDP for the plain gloo reference of the scaling benchmark.
        self.generator = wrap(generator) if wrap else generator
        self.discriminator = wrap(discriminator) if wrap else discriminator
        # Parameters of the wrapped models: a sync-BN conversion inside `wrap` shares them.
        self.d_params = list(self.discriminator.parameters())
        adam = {"betas": (cfg.train.beta1, cfg.train.beta2),
                **({"fused": True, "capturable": True} if graph_safe else {})}
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.train.lr_g, **adam)
        self.opt_d = torch.optim.Adam(self.d_params, lr=cfg.train.lr_d, **adam)
        self.criterion = nn.BCEWithLogitsLoss()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16",
                                       cache_enabled=not graph_safe)
        self.no_sync = getattr(self.discriminator, "no_sync", contextlib.nullcontext)
        self.device = device

    def step(self, real: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One update; returns loss_d + loss_g as a tensor (no host sync)."""
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast:
            fake = self.generator(noise)
            logits_real = self.discriminator(real)
            logits_fake = self.discriminator(fake.detach())
            loss_d = self.criterion(logits_real, torch.ones_like(logits_real)) + self.criterion(
                logits_fake, torch.zeros_like(logits_fake)
            )
        loss_d.backward()
        self.opt_d.step()

        self.opt_g.zero_grad(set_to_none=True)
        for param in self.d_params:
            param.requires_grad_(False)
        with self.no_sync(), self.autocast:
            logits_gen = self.discriminator(fake)
            loss_g = self.criterion(logits_gen, torch.ones_like(logits_gen))
        loss_g.backward()
        for param in self.d_params:
            param.requires_grad_(True)
        self.opt_g.step()
        return loss_d.detach() + loss_g.detach()

    def run(self, batches: Iterable[torch.Tensor], nz: int, seed: int = 0) -> float:
        """Train on every batch of `batches`; returns the summed losses (one sync, at the end)."""
        noise_rng = torch.Generator(device=self.device).manual_seed(seed)
        total = torch.zeros((), device=self.device)
        for pixels in batches:
            # uint8 over the bus, scaled on the device: what any loop fed by a loader does.
            real = pixels.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
            noise = torch.randn(real.shape[0], nz, device=self.device, generator=noise_rng)
            total += self.step(real, noise)
        return float(total)


def random_batches(count: int, batch_size: int, image_size: int, channels: int,
                   seed: int = 0) -> list[torch.Tensor]:
    """`count` distinct in-memory uint8 batches, as loaders hand them out (cycle them for
    longer runs)."""
    rng = torch.Generator().manual_seed(seed)
    shape = (batch_size, channels, image_size, image_size)
    return [torch.randint(0, 256, shape, generator=rng, dtype=torch.uint8) for _ in range(count)]
