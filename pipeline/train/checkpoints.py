"""The full training state on disk: save, load (weights_only=True), and every RNG state.

A checkpoint is one `state.pt` file in a directory (the directory Ray Train persists). It holds
only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads it and
nothing in it can run code. RNG states are stored as tensors (python's and numpy's too), one row
per rank, because each rank draws its own noise.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from pipeline.core.config import Config, from_dict

STATE_FILE = "state.pt"
FORMAT_VERSION = 3  # 2: the generator average and quality rows; 3: augmentation

class TrainState(TypedDict):
    """The full training state of a checkpoint, as `TrainLoop.snapshot` makes it and
    `load_state` returns it: plain tensors, numbers, strings, lists and dicts only, so that
    `torch.load(weights_only=True)` reads it."""

    format: int
    generator: dict[str, torch.Tensor]
    generator_ema: dict[str, torch.Tensor] | None  # None when ema_half_life_images is 0
    discriminator: dict[str, torch.Tensor]
    opt_g: dict[str, Any]
    opt_d: dict[str, Any]
    step: int
    epoch: int
    images_seen: int
    fixed_noise: torch.Tensor
    augment: dict[str, torch.Tensor]  # {"p": probability, "ada_sums": ADA's pending sums}
    rng: dict[str, torch.Tensor]  # `capture_rng` of every rank, stacked by rank
    config: dict[str, Any]  # `dataclasses.asdict(Config)`; `saved_config` gives it typed
    spec: dict[str, Any]  # the generator's GeneratorSpec
    world_size: int
    log_rows: list[dict[str, float]]
    quality_rows: list[dict[str, float]]
    grids: list[torch.Tensor]
    resumed_from_steps: list[int]


REQUIRED_KEYS = tuple(TrainState.__annotations__)


def saved_config(state: TrainState) -> Config:
    """The validated config a checkpoint was trained with."""
    return from_dict(Config, state["config"])


def save_state(state: TrainState, directory: str | Path) -> Path:
    """Write `state` to `directory/state.pt` (atomically: a crash leaves no half file)."""
    target_dir = Path(directory)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / STATE_FILE
    partial = target.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(target)
    return target


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainState:
    """Read `directory/state.pt` with weights_only=True; ValueError if a key is missing."""
    path = Path(directory) / STATE_FILE
    state = torch.load(path, map_location=map_location, weights_only=True)
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state['format']}, expected {FORMAT_VERSION}")
    return state


# --- RNG states as tensors ------------------------------------------------------------------------


def capture_rng(noise_generator: torch.Generator,
                augment_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every RNG state of this process as CPU tensors: torch CPU, CUDA (empty without),
    the noise and augmentation generators, python's `random` and numpy's global generator."""
    version, words, gauss_next = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    cuda = torch.empty(0, dtype=torch.uint8)
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": cuda,
        "noise": noise_generator.get_state(),
        "augment": augment_generator.get_state(),
        # python: 624 words + position, then (version, has gauss_next), and gauss_next itself.
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss_next is not None], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_cached], dtype=torch.float64),
    }


def restore_rng(states: dict[str, torch.Tensor], noise_generator: torch.Generator,
                augment_generator: torch.Generator) -> None:
    """Inverse of `capture_rng`: set every RNG of this process from `states`."""
    torch.set_rng_state(states["torch_cpu"].cpu())
    if torch.cuda.is_available() and states["torch_cuda"].numel():
        torch.cuda.set_rng_state(states["torch_cuda"].cpu())
    noise_generator.set_state(states["noise"].cpu())
    augment_generator.set_state(states["augment"].cpu())
    version, has_gauss = (int(v) for v in states["python_meta"].tolist())
    gauss = float(states["python_gauss"][0]) if has_gauss else None
    random.setstate((version, tuple(int(w) for w in states["python_words"].tolist()), gauss))
    np_pos, np_has_gauss = (int(v) for v in states["numpy_meta"].tolist())
    np.random.set_state(
        (
            "MT19937",
            states["numpy_keys"].numpy().astype(np.uint32),
            np_pos,
            np_has_gauss,
            float(states["numpy_gauss"][0]),
        )
    )


def rng_fits(states: dict[str, torch.Tensor], noise_generator: torch.Generator) -> bool:
    """Whether `states` (one rank's, from `capture_rng`) can be set on generators of
    `noise_generator`'s device: a CPU state is 5,056 bytes, a CUDA one 16."""
    return states["noise"].numel() == noise_generator.get_state().numel()


def stack_ranks(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[{key: tensor} per rank] -> {key: tensor (world_size, ...)} for the checkpoint."""
    return {key: torch.stack([states[key] for states in per_rank]) for key in per_rank[0]}


def rank_row(stacked: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The RNG states of one rank out of `stack_ranks` output, as compact copies: in torch
    2.13 `Generator.set_state` on a row view (a storage offset) crashes the process."""
    return {key: value[rank].clone() for key, value in stacked.items()}
