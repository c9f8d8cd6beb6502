"""Image grids: tensors in [-1, 1] to one PNG, without torchvision; enlarged copies to show."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.pixels import to_uint8

# A grid of 8 x 8 images of 32 px is 274 px wide: too small to read in a browser. Copies for
# people (the MLflow UI, compare images) are enlarged by a whole factor, nearest neighbour (no
# blur), to about this width (274 px: 3x, 64 px images: 2x, 128 px: 1x), at most 3x.
DISPLAY_WIDTH_PX = 800
MAX_DISPLAY_FACTOR = 3


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


def display_copy(image: Image.Image, width_px: int = DISPLAY_WIDTH_PX,
                 max_factor: int = MAX_DISPLAY_FACTOR) -> Image.Image:
    """`image` enlarged by the smallest whole factor (1..max_factor) that makes it about
    `width_px` wide, nearest neighbour, so that every pixel stays a sharp square."""
    factor = max(1, min(max_factor, math.ceil(width_px / max(image.width, image.height, 1))))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def save_display_copy(source: str | Path, target: str | Path) -> Path:
    """Write the display copy of the PNG `source` to `target`; returns `target`."""
    destination = Path(target)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        display_copy(image).save(destination, format="PNG")
    return destination
