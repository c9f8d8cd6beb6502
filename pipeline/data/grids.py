"""Image grids: tensors in [-1, 1] to one PNG, without torchvision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.pixels import to_uint8


def make_grid(images: torch.Tensor, nrow: int | None = None, padding_px: int = 2) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, `nrow` per row, on black."""
    pixels = to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()
    count, height, width, channels = pixels.shape
    per_row = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / per_row)
    canvas_height = rows * (height + padding_px) + padding_px
    canvas_width = per_row * (width + padding_px) + padding_px
    canvas = np.zeros((canvas_height, canvas_width, channels), dtype=np.uint8)
    for index in range(count):
        top = padding_px + (index // per_row) * (height + padding_px)
        left = padding_px + (index % per_row) * (width + padding_px)
        canvas[top : top + height, left : left + width] = pixels[index]
    return Image.fromarray(canvas[..., 0] if channels == 1 else canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a grid PNG of `images` to `path` (parents created) and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow).save(target, format="PNG", optimize=False)
    return target
