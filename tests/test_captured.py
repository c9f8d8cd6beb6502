"""`train.compile` on a CPU: the captured step's choice, its fallback and the step code it
shares with the eager loop. The capture itself needs CUDA: tests/test_gpu.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from benchmarks.plain_loop import PlainDCGAN
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError
from pipeline.train import captured
from pipeline.train import loop as training

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
STEPS = 4


def tiny_config(*overrides: str) -> Config:
    return load_config(REPO_ROOT / "params.yaml", [
        "model.nz=16", "model.ngf=8", "model.ndf=8", "data.image_size=16",
        "train.batch_size=4", "train.epochs=1", *overrides,
    ])


class Hooks:
    """`training.LoopHooks` of one CPU process that keeps nothing."""

    def before_step(self, step):
        pass

    def save_checkpoint(self, state, metrics):
        pass

    def log_rows(self, rows):
        pass

    def publish_grid(self, epoch, step, images):
        pass


def new_loop(cfg: Config, state: dict | None = None) -> training.TrainLoop:
    return training.TrainLoop(cfg, training.LoopEnv(0, 1, CPU, steps_per_epoch=STEPS), Hooks(),
                              state)


def batches(count: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(real in [-1, 1], noise) per step, the same every call."""
    rng = torch.Generator().manual_seed(7)
    return [(torch.rand(4, 1, 16, 16, generator=rng) * 2 - 1, torch.randn(4, 16, generator=rng))
            for _ in range(count)]


def source(epoch: int, skip: int):
    pixels = torch.Generator().manual_seed(epoch)
    images = [torch.randint(0, 256, (4, 1, 16, 16), generator=pixels, dtype=torch.uint8)
              for _ in range(STEPS)]
    for index in range(skip, STEPS):
        yield images[index], None


def optimizer_tensors(loop: training.TrainLoop) -> list[torch.Tensor]:
    return [value.clone() for optimizer in (loop.opt_g, loop.opt_d)
            for state in optimizer.state.values() for value in state.values()]


# --- the parameter ------------------------------------------------------------------------------


def test_compile_is_auto_or_off_and_anything_else_is_one_line_naming_the_key():
    assert tiny_config().train.compile == "auto"
    assert tiny_config("train.compile=off").train.compile == "off"
    with pytest.raises(ConfigError) as error:
        tiny_config("train.compile=max-autotune")
    assert str(error.value) == "train.compile: must be one of 'auto', 'off', got 'max-autotune'"


@pytest.mark.parametrize(("mode", "reason"), [
    ("auto", "device is cpu: CUDA graphs need a GPU"), ("off", "train.compile=off"),
])
def test_a_cpu_loop_steps_eagerly_and_logs_why_once(mode, reason, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.train.loop"):
        loop = new_loop(tiny_config(f"train.compile={mode}"))
    assert (loop.step_mode, loop.step_mode_reason, loop.captured_step) == ("eager", reason, None)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step:")]
    assert said == [f"train step: eager ({reason})"]


def test_what_blocks_a_capture_on_a_gpu():
    """Only DDP's wrapper blocks it at any world size: ranks > 1 capture with the bucketed
    gradient all-reduce (`collectives.GradientAllReduce`) instead."""
    gpu = torch.device("cuda", 0)
    assert captured.capture_blocker("auto", gpu, [torch.nn.Linear(1, 1)]) is None
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)  # the type is what counts
    assert captured.capture_blocker("auto", gpu, [ddp]) == (
        "a model is wrapped in DDP: its hooks cannot be captured")
    assert captured.capture_blocker("off", gpu, []) == "train.compile=off"
    with pytest.raises(ValueError, match=r"train\.compile"):
        captured.capture_blocker("fast", gpu, [])


# --- the step code both ways share ----------------------------------------------------------------


def test_the_step_recorded_for_a_graph_computes_what_the_eager_step_and_the_plain_loop_do():
    """`train_step` with its number as a device tensor (how a graph records it) takes the very
    steps of the eager call and of the benchmarks' plain DCGAN loop, bit for bit."""
    cfg = tiny_config("train.compile=off")
    eager, recorded, plain = new_loop(cfg), new_loop(cfg), PlainDCGAN(cfg)
    for number, (real, noise) in enumerate(batches(), start=1):
        eager.train_step(real, noise)
        recorded.train_step(real, noise, torch.tensor(float(number), dtype=torch.float64))
        plain.step(real, noise)
    digest = training.param_sha256(eager.generator, eager.discriminator)
    assert digest == training.param_sha256(recorded.generator, recorded.discriminator)
    assert digest == training.param_sha256(plain.generator, plain.discriminator)
    assert torch.equal(eager.sums, recorded.sums)
    assert eager.step == STEPS and recorded.step == 0  # a recorded step leaves Python alone


def test_the_nan_guard_records_the_step_from_the_step_tensor():
    loop = new_loop(tiny_config("train.compile=off"))
    for number, (real, noise) in enumerate(batches(), start=1):
        real = real.fill_(float("nan")) if number >= 3 else real
        loop.train_step(real, noise, torch.tensor(float(number), dtype=torch.float64))
    assert float(loop.first_bad_step) == 3.0


# --- a failed capture leaves nothing behind ------------------------------------------------------


@pytest.mark.parametrize("steps_before", [0, 2])
def test_a_warm_up_that_ran_and_a_capture_that_failed_leave_the_state_as_it_was(steps_before):
    """The warm-up takes real steps; after the capture fails (here: no CUDA), parameters,
    buffers, optimizer state and accumulators are back, and training continues as if nothing
    had been tried (fresh optimizer state included: zeros are Adam's lazy start)."""
    cfg = tiny_config("train.compile=off")
    tried, untouched = new_loop(cfg), new_loop(cfg)
    for real, noise in batches(steps_before):
        tried.train_step(real, noise)
        untouched.train_step(real, noise)
    before = training.param_sha256(tried.generator, tried.discriminator)
    buffers = [b.clone() for b in tried.generator.buffers()]
    opt_before, sums_before = optimizer_tensors(tried), tried.sums.clone()
    calls = []

    def update(real, noise, number, draws):
        calls.append(float(number))
        tried.train_step(real, noise, number, draws)

    state = captured.StepState((tried.generator, tried.discriminator),
                               (tried.opt_g, tried.opt_d),
                               (tried.sums, tried.first_bad_step, tried.ada_sums))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        captured.capture(update, state, (4, 1, 16, 16), (4, 16), CPU)

    assert len(calls) == captured.WARMUP_STEPS  # the warm-up did train
    assert training.param_sha256(tried.generator, tried.discriminator) == before
    assert all(torch.equal(a, b) for a, b in zip(buffers, tried.generator.buffers(), strict=True))
    after = optimizer_tensors(tried)
    if steps_before:
        assert all(torch.equal(a, b) for a, b in zip(opt_before, after, strict=True))
    else:
        assert after and all(not value.any() for value in after)
    assert torch.equal(tried.sums, sums_before)
    assert all(p.requires_grad for p in tried.discriminator.parameters())
    for real, noise in batches():
        tried.train_step(real, noise)
        untouched.train_step(real, noise)
    assert training.param_sha256(tried.generator, tried.discriminator) == training.param_sha256(
        untouched.generator, untouched.discriminator)


def test_a_capture_that_raises_falls_back_to_eager_with_the_reason(monkeypatch, caplog):
    """What `auto` does when capture is allowed but fails (forced on a CPU: capturable Adam
    refuses CPU tensors in the warm-up): eager, one logged reason, non-capturable optimizers,
    and the run ends where an eager run ends."""
    monkeypatch.setattr(captured, "capture_blocker", lambda *args: None)
    with caplog.at_level(logging.INFO, logger="pipeline.train.loop"):
        tried = new_loop(tiny_config("train.compile=auto"))
    assert tried.step_mode == "eager"
    assert tried.step_mode_reason.startswith("CUDA graph capture failed: AssertionError: If "
                                             "capturable=True, params and state_steps must be")
    assert [r.getMessage() for r in caplog.records if "train step" in r.getMessage()] == [
        f"train step: eager ({tried.step_mode_reason})"]
    assert not any(group["capturable"] for opt in (tried.opt_g, tried.opt_d)
                   for group in opt.param_groups)
    assert tried.autocast._cache_enabled  # off only for a step that is captured
    monkeypatch.undo()
    eager = new_loop(tiny_config("train.compile=off"))
    assert tried.run(source).steps == eager.run(source).steps == STEPS
    assert training.param_sha256(tried.generator, tried.discriminator) == training.param_sha256(
        eager.generator, eager.discriminator)


def test_a_checkpoint_of_a_captured_run_resumes_eagerly_on_a_cpu():
    """A GPU run's checkpoint holds capturable optimizers; a CPU resume makes them eager again
    (capturable Adam refuses CPU tensors) and ends where the uninterrupted run ends."""
    cfg = tiny_config("train.compile=auto", "train.epochs=2")
    straight = new_loop(cfg)
    straight.run(source)
    first = new_loop(tiny_config("train.compile=auto", "train.epochs=1"))
    first.run(source)
    state = first.snapshot(first._gather_rng())
    for optimizer in ("opt_g", "opt_d"):
        for group in state[optimizer]["param_groups"]:
            group["capturable"] = True  # as a captured GPU run saves it
    resumed = new_loop(cfg, state)
    assert resumed.run(source).steps == 2 * STEPS
    assert training.param_sha256(resumed.generator, resumed.discriminator) == training.param_sha256(
        straight.generator, straight.discriminator)


def test_a_checkpoint_with_cuda_random_streams_resumes_on_a_cpu_with_one_line(caplog):
    """A GPU run's noise and augmentation generators are CUDA (Philox) generators, whose
    16-byte states a CPU generator cannot take: the resume keeps weights, optimizers and
    progress, restarts those two streams from the seed and says so once."""
    cfg = tiny_config("train.epochs=2")
    first = new_loop(tiny_config("train.epochs=1"))
    first.run(source)
    state = first.snapshot(first._gather_rng())
    # What torch.Generator("cuda").get_state() holds: seed and offset, 8 bytes each.
    philox = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    state["rng"]["noise"] = philox.unsqueeze(0)
    state["rng"]["augment"] = philox.unsqueeze(0)
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        resumed = new_loop(cfg, state)
    assert [r.message for r in caplog.records if "restart from the seed" in r.message] == [
        "checkpoint's random streams are of another device type than this run's cpu: noise "
        "and augmentation streams restart from the seed"]
    assert resumed.step == STEPS
    assert resumed.run(source).steps == 2 * STEPS
