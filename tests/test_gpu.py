"""The captured step on a real GPU: world size 1 under NCCL, `train.compile: auto`, one epoch
and more, a checkpoint, a crash, a resume, and the parameter digest of an uninterrupted run.

Skipped (with the reason printed by `-ra`) where CUDA is absent. Needs only torch and this
repository (no Ray, MLflow, DVC or webdataset): the GPU machine has none of them. The loop is
the one Ray runs, and it places and wraps its models itself (`pipeline.train.placement`:
channels_last, fused Adam, DDP or the bucketed all-reduce), so these tests, the benchmark and
a Ray worker record the same step.

    python -m pytest tests/test_gpu.py -ra
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from devtools.ports import free_port
from pipeline.core.config import Config, load_config
from pipeline.train import checkpoints
from pipeline.train import loop as training

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the captured step needs one"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda", 0)
STEPS_PER_EPOCH = 8
BATCH = 32


class InjectedCrashError(Exception):
    """The fault a test injects before a step."""


class GpuHooks:
    """`training.LoopHooks` of one GPU worker without Ray; checkpoints go to `directory`."""

    def __init__(self, directory: Path, crash_at: int | None = None) -> None:
        self.directory, self.crash_at = directory, crash_at
        self.saved: list[Path] = []

    def before_step(self, step: int) -> None:
        if step == self.crash_at:
            raise InjectedCrashError(f"injected before step {step}")

    def save_checkpoint(self, state, metrics) -> None:
        if state is not None:  # written to disk as Ray persists it, read back weights_only
            target = self.directory / f"checkpoint_{metrics['step']:04d}"
            checkpoints.save_state(state, target)
            self.saved.append(target)

    def log_rows(self, rows) -> None:
        pass

    def publish_grid(self, epoch, step, images) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def nccl_world_of_one():
    """A one-rank NCCL process group, as a Ray Train GPU worker has; deterministic cuDNN, so
    that two runs of the same steps can be compared bit for bit."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEVICE)
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    dist.destroy_process_group()


def gpu_config(*overrides: str) -> Config:
    return load_config(REPO_ROOT / "params.yaml", [
        "data.image_size=32", "model.nz=32", "model.ngf=16", "model.ndf=16",
        f"train.batch_size={BATCH}", "train.epochs=2", "train.checkpoint_every_steps=5",
        "train.log_every_steps=3", "train.use_gpu=true",
        "train.r1_every_steps=3",  # R1's eager update between captured replays, every 3rd step
        *overrides,
    ])


def device_source(nan_at_step: int | None = None) -> training.BatchSource:
    """Deterministic uint8 batches already on the GPU (as the device cache hands them out);
    optionally one batch of NaNs at a global step."""
    pixels = torch.Generator().manual_seed(3)
    pool = [torch.randint(0, 256, (BATCH, 1, 32, 32), generator=pixels, dtype=torch.uint8)
            .to(DEVICE) for _ in range(2 * STEPS_PER_EPOCH)]

    def source(epoch: int, skip: int):
        for index in range(skip, STEPS_PER_EPOCH):
            step = epoch * STEPS_PER_EPOCH + index + 1
            if step == nan_at_step:
                yield torch.full(pool[0].shape, float("nan"), device=DEVICE), None
            else:
                yield pool[step - 1], None

    return source


def new_loop(cfg: Config, hooks: GpuHooks, state: dict | None = None) -> training.TrainLoop:
    env = training.LoopEnv(0, 1, DEVICE, steps_per_epoch=STEPS_PER_EPOCH)
    return training.TrainLoop(cfg, env, hooks, state)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_captured_run_resumed_after_a_crash_ends_with_the_uninterrupted_digest(
    precision, tmp_path
):
    cfg = gpu_config(f"train.precision={precision}", "train.compile=auto")
    straight = new_loop(cfg, GpuHooks(tmp_path / "straight"))
    assert straight.step_mode == "captured", straight.step_mode_reason
    expected = straight.run(device_source())
    assert expected.steps == 2 * STEPS_PER_EPOCH

    crashing_hooks = GpuHooks(tmp_path / "crashed", crash_at=STEPS_PER_EPOCH + 3)
    crashing = new_loop(cfg, crashing_hooks)
    with pytest.raises(InjectedCrashError):
        crashing.run(device_source())
    last = crashing_hooks.saved[-1]  # step 10: a whole epoch and two steps of the next
    state = checkpoints.load_state(last)
    assert state["step"] == 10

    resumed = new_loop(cfg, GpuHooks(tmp_path / "resumed"), state)
    assert resumed.step_mode == "captured", resumed.step_mode_reason
    result = resumed.run(device_source())
    assert result.resumed_from_steps == [10] and result.steps == 2 * STEPS_PER_EPOCH
    assert result.param_sha256_by_rank == expected.param_sha256_by_rank
    assert training.param_sha256(resumed.generator, resumed.discriminator) == (
        training.param_sha256(straight.generator, straight.discriminator))
    assert resumed.log_rows[-1] == {**straight.log_rows[-1],
                                    "images_per_s": resumed.log_rows[-1]["images_per_s"]}


def _assert_models_close(mine, theirs, rtol: float, atol: float) -> None:
    for ours, other in ((mine.generator, theirs.generator),
                        (mine.discriminator, theirs.discriminator)):
        for (name, a), b in zip(ours.state_dict().items(), other.state_dict().values(),
                                strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_the_captured_step_trains_like_the_eager_one(tmp_path):
    """Same data, same noise: the graph's replays end where eager steps with the same
    (capturable) Adam end, to rounding; and near plain eager Adam, whose bias correction runs
    on the host (after 8 steps at lr 2e-3 the two Adams may differ beyond 1e-4)."""
    captured, eager, plain = (
        new_loop(gpu_config(f"train.compile={mode}", "train.epochs=1"),
                 GpuHooks(tmp_path / name))
        for name, mode in (("captured", "auto"), ("eager", "off"), ("plain", "off")))
    assert (captured.step_mode, eager.step_mode) == ("captured", "eager")
    for optimizer in (eager.opt_g, eager.opt_d):  # before any step: state made on the device
        for group in optimizer.param_groups:
            group["capturable"] = True
    for loop in (captured, eager, plain):
        loop.run(device_source())
    _assert_models_close(captured, eager, rtol=1e-5, atol=1e-6)
    _assert_models_close(captured, plain, rtol=1e-2, atol=1e-3)
    for row, other in zip(captured.log_rows, eager.log_rows, strict=True):
        assert row["loss_d"] == pytest.approx(other["loss_d"], rel=1e-5)
        assert row["loss_g"] == pytest.approx(other["loss_g"], rel=1e-5)


def test_the_nan_guard_stops_a_captured_run_at_its_step(tmp_path):
    cfg = gpu_config("train.compile=auto", "train.checkpoint_every_steps=2",
                     "train.log_every_steps=1")
    hooks = GpuHooks(tmp_path)
    loop = new_loop(cfg, hooks)
    assert loop.step_mode == "captured", loop.step_mode_reason
    result = loop.run(device_source(nan_at_step=3))
    assert result.nonfinite_step == 3
    assert [checkpoints.load_state(path)["step"] for path in hooks.saved] == [2]


def test_a_ddp_wrapped_model_runs_eagerly_and_says_why(tmp_path):
    loop = new_loop(gpu_config("train.compile=auto", "train.gradient_allreduce=ddp"),
                    GpuHooks(tmp_path))
    assert isinstance(loop.generator, torch.nn.parallel.DistributedDataParallel)
    assert loop.step_mode == "eager"
    assert loop.step_mode_reason == "a model is wrapped in DDP: its hooks cannot be captured"


def test_the_gpu_worker_trains_channels_last_with_fused_adam(tmp_path):
    """What the benchmark measures is what a Ray GPU worker runs: NHWC weights (also the
    weight average's, so its foreach update needs no per-tensor fallback), NHWC batches in
    the graph, fused Adam, and autocast's cache off only for a captured step."""
    loop = new_loop(gpu_config("train.compile=auto", "train.precision=bf16"), GpuHooks(tmp_path))
    assert loop.step_mode == "captured", loop.step_mode_reason
    for model in (loop.generator, loop.discriminator, loop.ema.model):
        for name, param in model.named_parameters():
            if param.dim() == 4:
                assert param.is_contiguous(memory_format=torch.channels_last), name
    assert loop.captured_step.real.is_contiguous(memory_format=torch.channels_last)
    assert all(group["fused"] for opt in (loop.opt_g, loop.opt_d) for group in opt.param_groups)
    assert loop.autocast._cache_enabled is False
    eager = new_loop(gpu_config("train.compile=off", "train.precision=bf16"), GpuHooks(tmp_path))
    assert eager.autocast._cache_enabled is True
    assert all(group["fused"] and not group["capturable"] and opt.state == {}
               for opt in (eager.opt_g, eager.opt_d) for group in opt.param_groups)
    eager.run(device_source())  # fused Adam with its step counters kept on the GPU
    steps = [state["step"] for opt in (eager.opt_g,) for state in opt.state.values()]
    assert all(step.device.type == "cuda" for step in steps)


def test_the_bucketed_all_reduce_is_recorded_in_the_graph_and_trains_like_eager(tmp_path):
    """`train.gradient_allreduce=bucketed` (what `auto` picks for GPU ranks > 1), over the
    world of one: its NCCL all-reduces are captured with the step, and the replays end where
    eager steps with the same reducer and the same capturable fused Adam end."""
    loops = [new_loop(gpu_config(f"train.compile={mode}", "train.epochs=1",
                                 "train.gradient_allreduce=bucketed"), GpuHooks(tmp_path / mode))
             for mode in ("auto", "off")]
    captured, eager = loops
    assert captured.gradient_allreduce.mode == "bucketed" and captured.reduce_g is not None
    assert (captured.step_mode, eager.step_mode) == ("captured", "eager"), (
        captured.step_mode_reason)
    for optimizer in (eager.opt_g, eager.opt_d):
        for group in optimizer.param_groups:
            group["capturable"] = True
    for loop in loops:
        loop.run(device_source())
    _assert_models_close(captured, eager, rtol=1e-5, atol=1e-6)


def test_the_host_cache_hands_out_the_device_caches_batches():
    """`train.data_cache=host` on a GPU worker: batches gathered into pinned staging buffers
    and copied on a side stream are the device cache's batches, epoch after epoch (a buffer
    is never overwritten before its copy is done), and the split itself is not pinned."""
    from pipeline.data.cache import CachedBatches

    pixels = torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    options = {"batch_size": 32, "rank": 0, "world_size": 1, "num_batches": 12, "seed": 0,
               "device": DEVICE}
    on_device = CachedBatches(pixels, None, on_device=True, **options)
    on_host = CachedBatches(pixels, None, on_device=False, **options)
    assert not on_host.pixels.is_pinned() and on_host.staging.buffers[0].is_pinned()
    for epoch in range(3):
        host_batches = [images.clone() for images, _ in on_host(epoch)]  # used as they come
        device_batches = [images for images, _ in on_device(epoch)]
        assert len(host_batches) == 12
        for mine, theirs in zip(host_batches, device_batches, strict=True):
            assert mine.device == DEVICE and torch.equal(mine, theirs)
