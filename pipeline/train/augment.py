"""Differentiable augmentation of everything the discriminator sees (DiffAugment, ADA).

With a few thousand training images the discriminator memorises its reals and the generator
stops learning (Karras et al. 2020, "Training GANs with limited data"; Zhao et al. 2020,
"Differentiable augmentation"). Augmenting reals AND fakes, in D's step and in G's step, with
ops that gradients flow through, keeps D from telling them apart by memory while G still learns
the un-augmented distribution (the ops are ones G cannot "leak" into its samples at p < ~0.8).

* `train.augment: fixed` is DiffAugment: every op on every image (p = `train.augment_p`).
* `train.augment: adaptive` is ADA's controller: each op is applied to each image with
  probability p, and p follows the overfitting heuristic r_t = E[sign(D(augmented real))]:
  raised when r_t > `train.ada_target` (D is too sure of the reals), lowered when below, by
  `ada_every_steps * global_batch / ada_speed_images` per adjustment. The statistic is summed
  on the device and all-reduced over ranks, so every rank holds the same p.

Ops (`train.augment_ops`; `auto` = translation and cutout, plus colour for RGB):
translation (up to 1/8 of the side, zero fill), cutout (a square of half the side), colour
(brightness, saturation, contrast), and two that change what an image means for digits but not
for faces or scenes: flip (horizontal) and rot90. All are per-sample and happen before D, so
they commute with (Sync)BatchNorm: D normalises the augmented batch.

Randomness: every draw of one step is one uniform tensor `(3, batch, DRAWS_PER_IMAGE)` (the
real batch, the fakes of D's step, the fakes of G's step) from the loop's own augmentation
generator, drawn outside the step. The op parameters are pure functions of it, so a captured
CUDA graph takes the draws as a static input like the noise, and a p of 0 makes every op the
identity (`torch.where`, exact) whatever was drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.core.config import AUGMENT_OPS

AUGMENT_MODES = ("off", "fixed", "adaptive")
ALL_OPS = AUGMENT_OPS  # pipeline order
TRANSLATION_RATIO = 0.125  # DiffAugment's: up to 1/8 of the side
CUTOUT_RATIO = 0.5  # DiffAugment's: a square of half the side
DRAW_SETS = 3  # reals, fakes in D's step, fakes in G's step
# Per image: one "apply?" draw and the op's parameters, in this column order.
_COLUMNS = {
    "translation": (0, 1, 2),  # apply, dx, dy
    "cutout": (3, 4, 5),  # apply, centre x, centre y
    "color": (6, 7, 8, 9, 10, 11),  # apply/amount for brightness, saturation, contrast
    "flip": (12,),
    "rot90": (13, 14),  # apply, quarter turns (1..3)
}
DRAWS_PER_IMAGE = 15


def resolve_ops(spec: str, channels: int) -> tuple[str, ...]:
    """The op names of a `train.augment_ops` value (`auto` or a comma list, validated by the
    config), in pipeline order."""
    if spec == "auto":
        return ("translation", "cutout", "color") if channels == 3 else ("translation", "cutout")
    names = {name.strip() for name in spec.split(",")}
    return tuple(op for op in ALL_OPS if op in names)


def _applied(flag: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(B,) uniform draws -> (B, 1, 1, 1) booleans, true with probability p."""
    return (flag < p).view(-1, 1, 1, 1)


def _choice(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Uniform [0, 1) draws -> integers uniform in [low, high]."""
    return (u * (high - low + 1)).floor().clamp(max=high - low) + low


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by (dx, dy) whole pixels (B,) with zero fill, as one gather (its
    gradient is the scatter back)."""
    batch, channels, height, width = x.shape
    rows = torch.arange(height, device=x.device).view(1, height, 1) - dy.view(-1, 1, 1).long()
    cols = torch.arange(width, device=x.device).view(1, 1, width) - dx.view(-1, 1, 1).long()
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    index = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).view(batch, 1, -1)
    moved = x.reshape(batch, channels, -1).gather(2, index.expand(-1, channels, -1))
    return moved.view_as(x) * inside.unsqueeze(1).to(x.dtype)


def cutout(x: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Zero a square of CUTOUT_RATIO of the side centred at (cx, cy) (B,) in each image."""
    _, _, height, width = x.shape
    half_h, half_w = int(height * CUTOUT_RATIO + 0.5) // 2, int(width * CUTOUT_RATIO + 0.5) // 2
    rows = torch.arange(height, device=x.device).view(1, height, 1) - cy.view(-1, 1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width) - cx.view(-1, 1, 1)
    inside = (rows >= -half_h) & (rows < half_h) & (cols >= -half_w) & (cols < half_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _color(x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """DiffAugment's brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5)."""
    def amount(column: int) -> torch.Tensor:
        return u[:, column].view(-1, 1, 1, 1).to(x.dtype)

    a_b, v_b, a_s, v_s, a_c, v_c = _COLUMNS["color"]
    x = torch.where(_applied(u[:, a_b], p), x + (amount(v_b) - 0.5), x)
    mean = x.mean(dim=1, keepdim=True)
    x = torch.where(_applied(u[:, a_s], p), (x - mean) * (amount(v_s) * 2) + mean, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(_applied(u[:, a_c], p), (x - mean) * (amount(v_c) + 0.5) + mean, x)


def _rot90(x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    apply, turns = _COLUMNS["rot90"]
    quarter = _choice(u[:, turns], 1, 3).view(-1, 1, 1, 1)
    out = x
    for k in (1, 2, 3):
        out = torch.where(_applied(u[:, apply], p) & (quarter == k),
                          torch.rot90(x, k, dims=(2, 3)), out)
    return out


def augment(x: torch.Tensor, draws: torch.Tensor, p: torch.Tensor,
            ops: Sequence[str]) -> torch.Tensor:
    """`x` (B, C, H, W) in [-1, 1] with `ops` applied per image, each with probability `p`
    (a 0-dim tensor), from uniform `draws` (B, DRAWS_PER_IMAGE). Differentiable in `x`; the
    identity, exactly, where p = 0."""
    _, _, height, width = x.shape
    u = draws.to(x.device)
    if "translation" in ops:
        apply, col_x, col_y = _COLUMNS["translation"]
        shift_h, shift_w = int(height * TRANSLATION_RATIO + 0.5), int(width * TRANSLATION_RATIO
                                                                      + 0.5)
        moved = translate(x, _choice(u[:, col_x], -shift_w, shift_w),
                          _choice(u[:, col_y], -shift_h, shift_h))
        x = torch.where(_applied(u[:, apply], p), moved, x)
    if "cutout" in ops:
        apply, col_x, col_y = _COLUMNS["cutout"]
        cut = cutout(x, _choice(u[:, col_x], 0, width - 1), _choice(u[:, col_y], 0, height - 1))
        x = torch.where(_applied(u[:, apply], p), cut, x)
    if "color" in ops:
        x = _color(x, u, p)
    if "flip" in ops:
        (apply,) = _COLUMNS["flip"]
        x = torch.where(_applied(u[:, apply], p), x.flip(3), x)
    if "rot90" in ops and height == width:
        x = _rot90(x, u, p)
    return x


@dataclass(frozen=True)
class AdaSchedule:
    """How the adaptive p moves: toward `target` r_t, by `step_size` per adjustment."""

    target: float
    every_steps: int
    step_size: float  # every_steps * global_batch / ada_speed_images

    @classmethod
    def from_config(cls, target: float, every_steps: int, speed_images: int,
                    global_batch: int) -> AdaSchedule:
        return cls(target, every_steps, every_steps * global_batch / speed_images)


@torch.no_grad()
def adjust_p(p: torch.Tensor, sign_sum: torch.Tensor, count: torch.Tensor,
             schedule: AdaSchedule) -> None:
    """ADA's update in place, on the device (no host sync): p += sign(r_t - target) * step,
    clamped to [0, 1], where r_t = sign_sum / count (already summed over ranks)."""
    r_t = sign_sum / count.clamp(min=1)
    p.add_(torch.sign(r_t - schedule.target).to(p.dtype) * schedule.step_size).clamp_(0.0, 1.0)
