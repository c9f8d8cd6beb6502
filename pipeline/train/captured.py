"""The D+G training step recorded once as a CUDA graph and replayed: pure torch, no files.

`train.compile: auto` asks for it; `choose_step` says whether it can be had and why not
(`capture_blocker`), then tries (`capture`). A small DCGAN step is launch-bound on a GPU: a few
hundred kernel launches per step cost more CPU time than the GPU needs to run them, and one
graph replay launches them all at once.

What a captured step needs (PyTorch's "whole-network capture" recipe):

* static inputs: the real batch, the noise, the augmentation's uniform draws and the step
  number are copied into fixed tensors before each replay (the draws come from the loop's own
  generator outside the graph, so a replay repeats no randomness); everything the step
  writes (parameters, optimizer state, batch-norm buffers, the loop's on-device
  accumulators) is updated in place, at fixed addresses;
* optimizers with `capturable=True` (their step counters live on the device);
* gradients set to None before their backward inside the step, so that backward allocates
  them from the graph's pool and writes (not accumulates) them on every replay;
* a few warm-up steps on a side stream before capture (lazy optimizer state, cuDNN's choices);
* no DDP wrapper: its communication hooks invalidate the capture (seen on torch 2.11). At
  world size > 1 the gradients are averaged by `collectives.GradientAllReduce` inside the
  step instead (flat NCCL all-reduces, which a graph records), and torch's SyncBatchNorm skips
  its empty-rank filter while capturing (pytorch#78549), so the captured multi-GPU step has
  no host sync; the loop makes every rank agree on captured or eager.

Warm-up steps are real updates. They run on a snapshot-protected state: every parameter,
buffer, optimizer state tensor and accumulator is copied before, and copied back (in place, so
that the graph's addresses stay valid) after capture, whether capture worked or not. A run
therefore starts from exactly the state it would have had eagerly, every training step is a
replay, and a failed warm-up or capture leaves nothing half-updated behind. Optimizer state
that did not exist before the warm-up is zeroed, which is Adam's lazy initial state.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "off")
WARMUP_STEPS = 3  # PyTorch's recipe uses 3; DDP would need 11+, but it is never captured here

# update(real, noise, step, draws): one training step; `step` is a 0-dim float64 tensor on the
# device holding the step's 1-based number (the NaN guard records it without a host sync);
# `draws` the augmentation's uniforms of the step (drawn outside the graph, like the noise).
UpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class StepState:
    """Everything a training step writes: restored after the warm-up, captured by the graph."""

    modules: Sequence[nn.Module]
    optimizers: Sequence[torch.optim.Optimizer]
    tensors: Sequence[torch.Tensor] = ()  # on-device accumulators updated in place


def capture_blocker(
    compile_mode: str, device: torch.device, modules: Sequence[nn.Module]
) -> str | None:
    """Why the step cannot be captured here (one line), or None when it can be tried."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)}")
    if compile_mode == "off":
        return "train.compile=off"
    if device.type != "cuda":
        return f"device is {device.type}: CUDA graphs need a GPU"
    if any(isinstance(module, nn.parallel.DistributedDataParallel) for module in modules):
        return "a model is wrapped in DDP: its hooks cannot be captured"
    return None


def set_capturable(optimizers: Sequence[torch.optim.Optimizer], enabled: bool) -> None:
    """Switch optimizers between graph-safe (`capturable`: step counters on the parameter's
    device) and eager (counters on the CPU, as torch keeps them). `load_state_dict` brings back
    whatever flag the checkpoint's run had, so the loop sets it after loading, every time.
    Fused Adam keeps its counters on the device either way (its kernel reads them there)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["capturable"] = enabled
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    on_device = enabled or group.get("fused")
                    device = param.device if on_device else torch.device("cpu")
                    state["step"] = step.to(device=device, dtype=torch.float32)


# --- protecting the state during warm-up -----------------------------------------------------


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, str]]:
    return [(param, key) for group in optimizer.param_groups for param in group["params"]
            for key, value in optimizer.state.get(param, {}).items()
            if isinstance(value, torch.Tensor)]


class StateSnapshot:
    """A copy of a `StepState`, put back in place (same tensors, same addresses) by
    `restore`. Optimizer state created after the snapshot is zeroed on restore."""

    def __init__(self, state: StepState) -> None:
        self.state = state
        self.modules = [
            {name: value.detach().clone() for name, value in module.state_dict().items()}
            for module in state.modules
        ]
        self.optimizers = [
            {(param, key): optimizer.state[param][key].detach().clone()
             for param, key in _optimizer_tensors(optimizer)}
            for optimizer in state.optimizers
        ]
        self.tensors = [tensor.detach().clone() for tensor in state.tensors]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every saved value back into the live tensors."""
        for module, saved in zip(self.state.modules, self.modules, strict=True):
            for name, value in module.state_dict().items():
                value.copy_(saved[name])
        for optimizer, saved in zip(self.state.optimizers, self.optimizers, strict=True):
            for param, key in _optimizer_tensors(optimizer):
                live = optimizer.state[param][key]
                before = saved.get((param, key))
                if before is None:  # created by the warm-up: Adam's lazy state starts at 0
                    live.zero_()
                else:
                    live.copy_(before)
        for live, value in zip(self.state.tensors, self.tensors, strict=True):
            live.copy_(value)


# --- capture and replay ------------------------------------------------------------------------


class CapturedStep:
    """One recorded step: `step(real, noise, number, draws)` copies the inputs in and
    replays."""

    def __init__(self, graph: torch.cuda.CUDAGraph, real: torch.Tensor, noise: torch.Tensor,
                 number: torch.Tensor, draws: torch.Tensor) -> None:
        self.graph, self.real, self.noise, self.number = graph, real, noise, number
        self.draws = draws

    def __call__(self, real: torch.Tensor, noise: torch.Tensor, number: int,
                 draws: torch.Tensor) -> None:
        if real.shape != self.real.shape or noise.shape != self.noise.shape:
            raise ValueError(
                f"the captured step takes batches of {tuple(self.real.shape)} and noise of "
                f"{tuple(self.noise.shape)}, got {tuple(real.shape)} and {tuple(noise.shape)}"
            )
        self.real.copy_(real, non_blocking=True)
        self.noise.copy_(noise, non_blocking=True)
        self.draws.copy_(draws, non_blocking=True)
        self.number.fill_(number)
        self.graph.replay()


@contextlib.contextmanager
def _on(side: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block on `side` (after the work already queued on the current stream), or on
    the CPU as it is when there is no side stream. Leaving restores the current stream even
    when the block raised: torch.cuda.graph does not when its capture_end fails."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def _warm_up(update: UpdateFn, real: torch.Tensor, noise: torch.Tensor, number: torch.Tensor,
             draws: torch.Tensor, steps: int) -> None:
    with warnings.catch_warnings():
        # "capturable=True ... running without graph capture": expected, these are warm-ups.
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        for _ in range(steps):
            update(real, noise, number, draws)


def capture(update: UpdateFn, state: StepState, real_shape: Sequence[int],
            noise_shape: Sequence[int], device: torch.device,
            warmup_steps: int = WARMUP_STEPS, draws_shape: Sequence[int] = (0,),
            real_format: torch.memory_format = torch.contiguous_format) -> CapturedStep:
    """Warm `update` up and record it as one CUDA graph over static input tensors (the real
    batch in `real_format`, the layout the loop's batches come in). Raises what the warm-up
    or the capture raised; either way `state` ends as it was before.

    The warm-up runs on any device (on a CPU it is how the restore is tested); the capture
    needs CUDA and raises RuntimeError elsewhere."""
    real = torch.zeros(tuple(real_shape), device=device).contiguous(memory_format=real_format)
    noise = torch.zeros(tuple(noise_shape), device=device)
    number = torch.ones((), dtype=torch.float64, device=device)
    draws = torch.zeros(tuple(draws_shape), device=device)
    # Warm-up and capture must not run on the default stream (PyTorch's CUDA graph recipe).
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    snapshot = StateSnapshot(state)
    try:
        with _on(side):
            _warm_up(update, real, noise, number, draws, warmup_steps)
            if side is None:
                raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
            for optimizer in state.optimizers:
                # Backward inside the graph then allocates the grads from the graph's pool and
                # writes them afresh on every replay (the recipe sets them to None here).
                optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a loader thread's CUDA calls elsewhere do not break the capture.
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                update(real, noise, number, draws)
    finally:
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
        snapshot.restore()
    return CapturedStep(graph, real, noise, number, draws)


@dataclass(frozen=True)
class StepChoice:
    """The step implementation a loop runs: `captured` is None for eager."""

    mode: str  # "captured" | "eager"
    reason: str
    captured: CapturedStep | None = None
    tried: bool = False  # whether a capture was attempted (the same answer on every rank)


def choose_step(compile_mode: str, *, device: torch.device, update: UpdateFn,
                state: StepState, real_shape: Sequence[int], noise_shape: Sequence[int],
                draws_shape: Sequence[int] = (0,),
                real_format: torch.memory_format = torch.contiguous_format) -> StepChoice:
    """Capture the step where `compile_mode` asks and it works, else eager; the optimizers are
    left capturable exactly when the step is captured."""
    blocker = capture_blocker(compile_mode, device, state.modules)
    if blocker is not None:
        set_capturable(state.optimizers, False)
        return StepChoice("eager", blocker)
    set_capturable(state.optimizers, True)
    try:
        captured = capture(update, state, real_shape, noise_shape, device,
                           draws_shape=draws_shape, real_format=real_format)
    except Exception as err:  # any failure means: train eagerly, and say why
        set_capturable(state.optimizers, False)
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return StepChoice("eager", f"CUDA graph capture failed: {type(err).__name__}: "
                                   f"{first_line}", tried=True)
    return StepChoice("captured", f"the D+G step is one CUDA graph on {device} "
                                  f"({WARMUP_STEPS} warm-up steps, state restored)", captured,
                      tried=True)
