"""The one conversion between stored pixels (uint8, 0..255) and model images (float, [-1, 1]).

Loaders hand out uint8 batches (a quarter of the bytes over the bus); the consumer converts them
on its device with `to_signed`, which gives the same float32 values on every device.
"""

from __future__ import annotations

import torch


def to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 images in [-1, 1] (x / 127.5 - 1), on the tensor's device."""
    return pixels.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 pixels (clamped, rounded to the nearest level), same layout."""
    return (images.detach().float().clamp(-1, 1).add(1).mul_(127.5)).round_().to(torch.uint8)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images to the 256 levels a PNG holds, so that generated images are measured as
    they would be saved (real ones come from PNGs and are already on them)."""
    return to_signed(to_uint8(images))
