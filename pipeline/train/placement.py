"""Where a rank's models and batches live, and how they are wrapped for data parallelism.

One answer for the Ray workers, the benchmarks and the GPU tests (they all run `TrainLoop`,
which calls this module), so that a GPU figure is a figure of what users get:

* on CUDA, models, their weight average and every batch are channels_last (NHWC): bf16
  convolutions run on tensor cores in that layout, in NCHW they pay transposes; on a CPU
  everything stays as it is (contiguous NCHW, the layout the CPU figures and digests assume);
* on CUDA, Adam is the fused kernel (one launch over all parameters instead of ~15 foreach
  passes); on a CPU torch's default;
* at world size > 1 gradients are averaged by DDP, or by `collectives.GradientAllReduce`
  (one flat all-reduce per model after its backward, which a CUDA graph can record; DDP's
  hooks cannot be): `train.gradient_allreduce`, see `choose_gradient_allreduce`.

`configure_process` is the per-process part (cuDNN's autotuner, the current device), for
whoever owns the process: the Ray worker, a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.collectives import no_forward_buffer_sync

GRADIENT_ALLREDUCE_MODES = ("auto", "ddp", "bucketed")


def configure_process(device: torch.device) -> None:
    """Per-process settings of a CUDA rank: its current device, and cuDNN's autotuner (the
    step's shapes never change, so the fastest algorithms are found once)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of 4-d weights and batches on `device`."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def place_module(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` on `device` in its layout (in place, returned for chaining)."""
    return module.to(device, memory_format=memory_format(device))


def place_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch (N, C, H, W) on `device` in its layout."""
    return images.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))


def adam_options(device: torch.device) -> dict[str, Any]:
    """Adam's implementation keywords on `device` (fused on CUDA, torch's default elsewhere:
    the CPU numbers stay those of every earlier run)."""
    return {"fused": True} if device.type == "cuda" else {}


def keep_own_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: a checkpoint brings back its run's `fused`/`foreach` flags
    (a GPU checkpoint resumed on a CPU would ask for fused CPU Adam); keep this run's."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


@dataclass(frozen=True)
class GradientAllReduceChoice:
    """How gradients are averaged: `none` (one rank), `ddp` or `bucketed`, and why."""

    mode: str
    reason: str


def choose_gradient_allreduce(setting: str, *, world_size: int, device: torch.device,
                              compile_mode: str, process_group: bool) -> GradientAllReduceChoice:
    """`train.gradient_allreduce`: `auto` averages with the bucketed all-reduce where the
    step may be captured (CUDA, `train.compile=auto`), else with DDP (it overlaps the
    all-reduce with the backward), and needs none for one rank; `ddp` and `bucketed` are
    honoured at any world size that has a process group (a benchmark's world of one)."""
    if setting not in GRADIENT_ALLREDUCE_MODES:
        raise ValueError(
            f"train.gradient_allreduce must be one of {', '.join(GRADIENT_ALLREDUCE_MODES)}")
    if setting != "auto":
        if world_size > 1 or process_group:
            return GradientAllReduceChoice(setting, f"train.gradient_allreduce={setting}")
        return GradientAllReduceChoice("none", "one rank, no process group")
    if world_size == 1:
        return GradientAllReduceChoice("none", "one rank")
    if device.type == "cuda" and compile_mode == "auto":
        return GradientAllReduceChoice(
            "bucketed", "train.gradient_allreduce=auto: the step can be one CUDA graph with it")
    return GradientAllReduceChoice(
        "ddp", "train.gradient_allreduce=auto: eager step, DDP overlaps it with the backward")


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`model` (already placed) wrapped in DDP as Ray's `prepare_model` would, with the
    buffer keyword of the installed torch (`collectives.no_forward_buffer_sync`)."""
    devices = {"device_ids": [device], "output_device": device} if device.type == "cuda" else {}
    return DistributedDataParallel(model, **devices, **no_forward_buffer_sync())
