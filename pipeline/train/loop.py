"""The DCGAN training loop of one rank: pure torch, no files, no env vars, no Ray.

Everything outside torch comes in through `LoopHooks` (persist a checkpoint, log rows,
publish a grid, fault injection) and a `BatchSource`, so the same loop runs under Ray Train
(`pipeline.train.ray_runner`), in a plain gloo process group, or in one process. Where the
models live and how their gradients are averaged is the loop's own (`placement`): the Ray
workers, the benchmarks and the tests train the same wrapped models.

Speed: no host sync per step. Losses and D outputs are summed on the device and read (one
all-reduce, one copy) only every `train.log_every_steps`, at checkpoints and at the end; a
non-finite loss is remembered on the device with its step and checked at those points, before
any checkpoint is written, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.config import Config
from pipeline.data.pixels import to_signed, to_uint8
from pipeline.metrics.probe import QualityProbe
from pipeline.models.dcgan import GeneratorSpec, build_discriminator, build_generator
from pipeline.train import augment, captured, checkpoints, placement, sync_bn
from pipeline.train.collectives import GradientAllReduce, all_gather, all_gather_hex
from pipeline.train.ema import GeneratorEma
from pipeline.train.shm_allreduce import channel_for, register_ddp_hook, use_shared_memory

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "epoch", "loss_d", "loss_g", "d_real", "d_fake", "augment_p", "ada_rt",
               "images_per_s")
# The on-device sums of a log window, by name (`TrainLoop.sums`); `ada_rt` = E[sign(D(real))].
WINDOW_STATS = ("loss_d", "loss_g", "d_real", "d_fake", "ada_rt", "steps")
SAMPLE_GRID_SIZE = 64  # fixed-noise images per epoch grid (8 x 8)
_NO_BAD_STEP = float("inf")
AUGMENT_SEED_OFFSET = 1 << 40  # the augmentation's stream never meets a rank's noise stream

# (epoch, skip_batches) -> exactly steps_per_epoch - skip_batches (images, labels) batches.
BatchSource = Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor | None]]]


class LoopHooks(Protocol):
    """What the loop needs from its runner (Ray Train in production)."""

    def before_step(self, step: int) -> None:
        """Called before every step (1-based); fault injection lives here."""

    def save_checkpoint(self, state: checkpoints.TrainState | None,
                        metrics: dict[str, Any]) -> None:
        """Called on EVERY rank the same number of times; `state` is None except on rank 0."""

    def log_rows(self, rows: list[dict[str, float]]) -> None:
        """Rank 0: new train-log rows (batched: at epoch ends, checkpoints and the end)."""

    def publish_grid(self, epoch: int, step: int, images: torch.Tensor) -> None:
        """Rank 0: the fixed-noise samples (N, C, H, W) in [-1, 1] at the end of `epoch`
        (epoch 0, step 0: before training)."""

    def log_quality(self, rows: list[dict[str, float]]) -> None:
        """Rank 0: new quality rows (`probe.QUALITY_COLUMNS`), batched like `log_rows`."""


@dataclass(frozen=True)
class LoopEnv:
    """Where this rank runs and how long the run is."""

    rank: int
    world_size: int
    device: torch.device
    steps_per_epoch: int


@dataclass
class LoopResult:
    """What a finished (or stopped) run hands back; rank 0's is the one that counts."""

    steps: int
    images_seen: int
    resumed_from_steps: list[int]
    param_sha256_by_rank: list[str] = field(default_factory=list)
    nonfinite_step: int | None = None
    quality_s: float = 0.0  # rank 0's time measuring quality (and the average's statistics)
    worker_node_ids: list[str] = field(default_factory=list)  # by rank (Ray fills it in)


def generator_spec(cfg: Config) -> GeneratorSpec:
    """The generator shape a config asks for."""
    return GeneratorSpec(cfg.model.nz, cfg.model.ngf, cfg.data.image_size, cfg.data.channels)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def param_sha256(*models: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal digests = bit-identical weights."""
    digest = hashlib.sha256()
    for model in models:
        for param in unwrap(model).parameters():
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def untrained_samples(generator: nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """What a freshly initialised generator draws from `noise`, normalised with the batch's
    statistics as in training (its running statistics, still 0 and 1, would give a flat grey).
    Runs on a copy: the model, its buffers and every RNG stay as they were."""
    probe = copy.deepcopy(generator).train()
    with torch.no_grad():
        return probe(noise).float().clamp(-1, 1)


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else (
        contextlib.nullcontext()
    )


class TrainLoop:
    """One rank's models, optimizers, RNGs and progress; `run()` trains to the end."""

    def __init__(
        self,
        cfg: Config,
        env: LoopEnv,
        hooks: LoopHooks,
        resume_state: checkpoints.TrainState | None = None,
        probe: QualityProbe | None = None,
    ) -> None:
        self.cfg, self.env, self.hooks, self.probe = cfg, env, hooks, probe
        train = cfg.train
        self.total_steps = train.epochs * env.steps_per_epoch
        self.global_batch = train.batch_size * env.world_size
        self.spec = generator_spec(cfg)

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(train.seed)
        generator = build_generator(self.spec)
        discriminator = build_discriminator(cfg.model.ndf, cfg.data.image_size, cfg.data.channels)
        self.fixed_noise = torch.randn(
            SAMPLE_GRID_SIZE, cfg.model.nz, generator=torch.Generator().manual_seed(train.seed)
        )
        # Each rank draws its own noise (its share of the global batch), reproducibly.
        self.noise_rng = torch.Generator(device=env.device)
        self.noise_rng.manual_seed(train.seed * 100_003 + env.rank)
        self._init_augment()

        self.step = 0
        self.log_rows: list[dict[str, float]] = []
        self.quality_rows: list[dict[str, float]] = []
        self.grids: list[torch.Tensor] = []
        self.resumed_from_steps: list[int] = []
        # Rank 0 of a fresh run publishes what the untrained generator draws (step 0).
        self.initial_samples = (
            untrained_samples(generator, self.fixed_noise)
            if resume_state is None and env.rank == 0 else None
        )
        if resume_state is not None:
            self._load_models(generator, discriminator, resume_state)
        self.ema = self._make_ema(generator, resume_state)
        # The quality batch: fixed noise of N (the evaluate stage's N), drawn from its own
        # generator so that no training RNG moves.
        quality_count = probe.num_samples if probe is not None else cfg.eval.num_samples
        self.quality_noise = torch.randn(
            quality_count, cfg.model.nz, generator=torch.Generator().manual_seed(train.seed + 1)
        ).to(env.device)
        self.ema_refreshed_at_step = -1

        # SyncBatchNorm's and the gradients' all-reduces; before the first forward.
        use_shared_memory(train.cpu_allreduce == "auto")
        self.gradient_allreduce = placement.choose_gradient_allreduce(
            train.gradient_allreduce, world_size=env.world_size, device=env.device,
            compile_mode=train.compile, process_group=dist.is_available() and dist.is_initialized())
        if train.sync_batchnorm and env.world_size > 1:
            # Before DDP wrapping: DDP must see the final modules.
            generator = sync_bn.convert_sync_batchnorm(generator, env.device)
            discriminator = sync_bn.convert_sync_batchnorm(discriminator, env.device)
        self.generator = self._wrap(generator)
        self.discriminator = self._wrap(discriminator)
        self.reduce_g = self.reduce_d = None
        if self.gradient_allreduce.mode == "bucketed":
            self.reduce_g = GradientAllReduce(self.generator.parameters(), env.world_size)
            self.reduce_d = GradientAllReduce(self.discriminator.parameters(), env.world_size)
        if env.device.type == "cpu" and self.gradient_allreduce.mode != "none":
            self._choose_cpu_allreduce(train.cpu_allreduce)
        if env.rank == 0 and self.gradient_allreduce.mode != "none":
            logger.info("gradient all-reduce: %s (%s)", self.gradient_allreduce.mode,
                        self.gradient_allreduce.reason)
        self.fixed_noise = self.fixed_noise.to(env.device)

        betas, adam = (train.beta1, train.beta2), placement.adam_options(env.device)
        self.opt_g = torch.optim.Adam(
            unwrap(self.generator).parameters(), lr=train.lr_g, betas=betas, **adam
        )
        self.opt_d = torch.optim.Adam(
            unwrap(self.discriminator).parameters(), lr=train.lr_d, betas=betas, **adam
        )
        self.criterion = nn.BCEWithLogitsLoss()
        if resume_state is not None:
            self._load_progress(resume_state)

        # On-device accumulators of the log window, one per WINDOW_STATS name.
        self.sums = torch.zeros(len(WINDOW_STATS), dtype=torch.float64, device=env.device)
        self.first_bad_step = torch.full((), _NO_BAD_STEP, dtype=torch.float64, device=env.device)
        self.pending_rows: list[dict[str, float]] = []
        self.pending_quality: list[dict[str, float]] = []
        self.quality_s = 0.0
        self.window_started = time.perf_counter()
        self.window_start_step = self.step
        self._choose_step()

    # --- resume ---------------------------------------------------------------------------------

    def _load_models(self, generator: nn.Module, discriminator: nn.Module,
                     state: checkpoints.TrainState) -> None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        self.fixed_noise = state["fixed_noise"].cpu()

    def _make_ema(self, generator: nn.Module, state: checkpoints.TrainState | None
                  ) -> GeneratorEma | None:
        """Rank 0's weight average (others never need it), from the checkpoint on resume."""
        half_life = self.cfg.train.ema_half_life_images
        if self.env.rank != 0 or half_life == 0:
            return None
        ema = GeneratorEma(generator, half_life, self.global_batch)
        if state is not None and state["generator_ema"] is not None:
            ema.load_state_dict(state["generator_ema"])
        # The layout of the generator's own weights: one foreach lerp over matching strides.
        placement.place_module(ema.model, self.env.device)
        return ema

    def _load_progress(self, state: checkpoints.TrainState) -> None:
        for optimizer, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            optimizer.load_state_dict(state[key])
            placement.keep_own_implementation(optimizer)
        self.step = int(state["step"])
        self.log_rows = list(state["log_rows"])
        self.quality_rows = list(state["quality_rows"])
        self.grids = list(state["grids"])
        self.resumed_from_steps = [*state["resumed_from_steps"], self.step]
        saved_augment = state["augment"]
        self.augment_p.copy_(saved_augment["p"])
        self.ada_sums.copy_(saved_augment["ada_sums"])
        # Weights, optimizers and progress resume in any case; the random streams only where
        # they can: same ranks, and states of this device type (CPU Mersenne Twister vs CUDA
        # Philox states do not convert).
        if int(state["world_size"]) != self.env.world_size:
            why = f"checkpoint has {state['world_size']} ranks, this run {self.env.world_size}"
        else:
            own = checkpoints.rank_row(state["rng"], self.env.rank)
            if checkpoints.rng_fits(own, self.noise_rng):
                checkpoints.restore_rng(own, self.noise_rng, self.augment_rng)
                return
            why = (f"checkpoint's random streams are of another device type than this run's "
                   f"{self.env.device.type}")
        if self.env.rank == 0:
            logger.warning("%s: noise and augmentation streams restart from the seed", why)

    def _autocast(self, cache_enabled: bool) -> torch.autocast:
        train = self.cfg.train
        return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16,
                              enabled=train.precision == "bf16", cache_enabled=cache_enabled)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The model on this rank's device in its layout, in DDP where DDP averages."""
        model = placement.place_module(model, self.env.device)
        if self.gradient_allreduce.mode == "ddp":
            return placement.data_parallel(model, self.env.device)
        return model

    def _choose_cpu_allreduce(self, setting: str) -> None:
        """Ranks on one x86 machine average gradients (and SyncBN statistics) through shared
        memory, not gloo's TCP (`train.cpu_allreduce=auto`); `gloo` keeps gloo throughout."""
        models = (self.generator, self.discriminator)
        if self.gradient_allreduce.mode == "ddp":
            shared = [register_ddp_hook(model) for model in models]
        else:  # the bucketed all-reduce asks `collectives` for the channel itself
            shared = [channel_for() is not None]
        if self.env.rank == 0:
            how = ("shared memory (train.cpu_allreduce=auto: the ranks share this machine)"
                   if all(shared) else
                   "gloo (train.cpu_allreduce=gloo)" if setting == "gloo" else
                   "gloo (train.cpu_allreduce=auto: ranks on several machines, or not x86-64)")
            logger.info("CPU all-reduce: %s", how)

    def _init_augment(self) -> None:
        """The augmentation of what D sees (`augment.py`): its ops, p (a device tensor, so the
        adaptive controller and a captured step never sync the host), its own generator."""
        train, env = self.cfg.train, self.env
        self.augment_ops = (() if train.augment == "off"
                            else augment.resolve_ops(train.augment_ops, self.cfg.data.channels))
        initial_p = train.augment_p if train.augment == "fixed" else 0.0
        self.augment_p = torch.tensor(initial_p, dtype=torch.float32, device=env.device)
        self.ada = (augment.AdaSchedule.from_config(
            train.ada_target, train.ada_every_steps, train.ada_speed_images,
            train.batch_size * env.world_size) if train.augment == "adaptive" else None)
        # Sum of sign(D(augmented real)) and its count since the last adjustment of p.
        self.ada_sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        # One stream on every rank, drawn for the global batch, each rank taking its rows: the
        # same images are augmented the same way whatever the world size.
        self.augment_rng = torch.Generator(device=env.device)
        self.augment_rng.manual_seed(train.seed * 100_003 + AUGMENT_SEED_OFFSET)
        per_image = augment.DRAWS_PER_IMAGE if self.augment_ops else 0
        self.global_draws_shape = (augment.DRAW_SETS, train.batch_size * env.world_size,
                                   per_image)
        self.draws_shape = (augment.DRAW_SETS, train.batch_size, per_image)
        self.draw_rows = slice(env.rank * train.batch_size, (env.rank + 1) * train.batch_size)

    def _draw(self) -> torch.Tensor:
        """This rank's augmentation draws of the step (empty when augmentation is off: no RNG
        moves)."""
        draws = torch.rand(self.global_draws_shape, device=self.env.device,
                           generator=self.augment_rng)
        return draws[:, self.draw_rows]

    def _augmented(self, images: torch.Tensor, draws: torch.Tensor, which: int) -> torch.Tensor:
        """`images` as D sees them: augmented with the `which`-th set of the step's draws."""
        if not self.augment_ops:
            return images
        return augment.augment(images, draws[which], self.augment_p, self.augment_ops)

    def _adjust_augment(self) -> None:
        """ADA: every `ada_every_steps`, move p by the ranks' summed r_t (the same on all)."""
        if self.ada is None or self.step % self.ada.every_steps:
            return
        if self.env.world_size > 1:
            dist.all_reduce(self.ada_sums)
        augment.adjust_p(self.augment_p, self.ada_sums[0], self.ada_sums[1], self.ada)
        self.ada_sums.zero_()

    # --- one step -------------------------------------------------------------------------------

    def _choose_step(self) -> None:
        """Captured (one CUDA graph, `train.compile: auto` on a GPU) or eager `train_step`:
        sets `step_mode` and `step_mode_reason`, logged once. After the resume state is
        loaded, so the graph is recorded over the live (resumed) tensors. Every rank takes
        the same way (a rank whose capture failed makes them all eager)."""
        cfg, env = self.cfg, self.env
        # A CUDA graph must not keep autocast's cast cache across replays: off while the step
        # may be captured, on again for an eager step (the same numbers, fewer casts).
        self.autocast = self._autocast(cache_enabled=False)
        choice = captured.choose_step(
            cfg.train.compile, device=env.device, update=self.train_step,
            state=captured.StepState((self.generator, self.discriminator),
                                     (self.opt_g, self.opt_d),
                                     (self.sums, self.first_bad_step, self.ada_sums)),
            real_shape=(cfg.train.batch_size, cfg.data.channels, cfg.data.image_size,
                        cfg.data.image_size),
            noise_shape=(cfg.train.batch_size, cfg.model.nz),
            draws_shape=self.draws_shape, real_format=placement.memory_format(env.device),
        )
        if env.world_size > 1 and choice.tried:
            captured_everywhere = torch.tensor(float(choice.captured is not None),
                                               device=env.device)
            dist.all_reduce(captured_everywhere, op=dist.ReduceOp.MIN)
            if choice.captured is not None and not bool(captured_everywhere):
                captured.set_capturable((self.opt_g, self.opt_d), False)
                choice = captured.StepChoice("eager", "another rank's CUDA graph capture failed",
                                             tried=True)
        self.autocast = self._autocast(cache_enabled=choice.captured is None)
        self.step_mode, self.step_mode_reason = choice.mode, choice.reason
        self.captured_step = choice.captured
        if env.rank == 0:
            logger.info("train step: %s (%s)", self.step_mode, self.step_mode_reason)

    def _step(self, real: torch.Tensor, noise: torch.Tensor) -> None:
        """One step the chosen way (a replay of the captured graph, or `train_step`), then,
        outside any graph, R1's update of D every `r1_every_steps`, ADA's adjustment of p and
        the weight average's update."""
        draws = self._draw()
        if self.captured_step is None:
            self.train_step(real, noise, draws=draws)
        else:
            self.step += 1
            self.captured_step(real, noise, self.step, draws)
        if self.cfg.train.r1_gamma and self.step % self.cfg.train.r1_every_steps == 0:
            self._r1_step(real, draws)
        self._adjust_augment()
        if self.ema is not None:
            self.ema.update(unwrap(self.generator), self.step * self.global_batch)

    def _r1_step(self, real: torch.Tensor, draws: torch.Tensor) -> None:
        """Lazy R1 (Mescheder et al. 2018, StyleGAN2's lazy regularisation): one more D update
        on gamma/2 E||grad_x D(x)||^2 of the step's reals as D saw them, weighted by the
        interval. Eager and fp32, also between captured replays; D's BatchNorms normalise as
        in training, differentiably twice (`sync_bn.differentiable_twice`)."""
        train = self.cfg.train
        self.opt_d.zero_grad(set_to_none=True)
        seen = self._augmented(real, draws, 0).detach().requires_grad_(True)
        with sync_bn.differentiable_twice(self.discriminator):
            logits = self.discriminator(seen)
        (grad,) = torch.autograd.grad(logits.sum(), seen, create_graph=True)
        penalty = grad.square().flatten(1).sum(1)
        # `logits * 0`: every parameter of D takes part, as DDP's reducer expects of a backward.
        gain = train.r1_gamma / 2 * train.r1_every_steps
        (penalty * gain + logits * 0).mean().backward()
        self._average_gradients(self.reduce_d)
        self.opt_d.step()

    @staticmethod
    def _average_gradients(reduce: GradientAllReduce | None) -> None:
        """The bucketed all-reduce of one model's gradients (DDP does it in the backward)."""
        if reduce is not None:
            reduce()

    def train_step(
        self, real: torch.Tensor, noise: torch.Tensor, step: torch.Tensor | None = None,
        draws: torch.Tensor | None = None,
    ) -> None:
        """One DCGAN update: D on real and on fake.detach(), then G with the non-saturating
        loss BCE(D(G(z)), 1), D seeing both augmented (`augment.py`) when it is on.
        Statistics accumulate on the device (no host sync).

        `step`: None counts `self.step` here (eager); a device tensor holding the step's number
        when the step is being recorded as a CUDA graph (`captured.py`), whose replays must
        not depend on Python state. `draws`: the augmentation's uniforms, drawn here when None
        (eager); a static input of the graph when captured."""
        generator, discriminator, criterion = self.generator, self.discriminator, self.criterion
        draws = self._draw() if draws is None else draws

        # D: both forwards, ONE backward, so DDP all-reduces D's gradients once per step.
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast:
            fake = generator(noise)
            logits_real = discriminator(self._augmented(real, draws, 0))
            logits_fake = discriminator(self._augmented(fake.detach(), draws, 1))
            loss_d = criterion(logits_real, torch.ones_like(logits_real)) + criterion(
                logits_fake, torch.zeros_like(logits_fake)
            )
        loss_d.backward()
        self._average_gradients(self.reduce_d)
        self.opt_d.step()

        # G: D's weights need no gradient here; no_sync keeps DDP from all-reducing D.
        self.opt_g.zero_grad(set_to_none=True)
        d_params = list(unwrap(discriminator).parameters())
        for param in d_params:
            param.requires_grad_(False)
        try:
            with _no_sync(discriminator), self.autocast:
                logits_gen = discriminator(self._augmented(fake, draws, 2))
                loss_g = criterion(logits_gen, torch.ones_like(logits_gen))
            loss_g.backward()
        finally:
            for param in d_params:
                param.requires_grad_(True)
        self._average_gradients(self.reduce_g)
        self.opt_g.step()

        if step is None:
            self.step += 1
        with torch.no_grad():
            losses = torch.stack([loss_d.detach(), loss_g.detach()]).double()
            signs = torch.sign(logits_real.float())
            d_out = torch.stack(
                [torch.sigmoid(logits_real.float()).mean(),
                 torch.sigmoid(logits_fake.float()).mean(), signs.mean()]
            ).double()
            self.sums += torch.cat([losses, d_out, losses.new_ones(1)])
            count = signs.new_full((), float(signs.numel()))
            self.ada_sums += torch.stack([signs.sum(), count]).double()
            finite = torch.isfinite(losses).all()
            number = float(self.step) if step is None else step
            # In place: a captured graph keeps writing to the tensor it was recorded with.
            self.first_bad_step.copy_(torch.where(
                finite, self.first_bad_step, self.first_bad_step.clamp(max=number)
            ))

    # --- sync points ----------------------------------------------------------------------------

    def _sync_window(self) -> int | None:
        """Close the current log window: all-reduce the sums, append a log row, reset.
        Returns the first step with a non-finite loss on any rank (None if all finite)."""
        sums, first_bad = self.sums.clone(), self.first_bad_step.clone()
        if self.env.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        values = dict(zip(WINDOW_STATS, sums.tolist(), strict=True))  # the window's host sync
        bad = float(first_bad)
        elapsed = time.perf_counter() - self.window_started
        steps = self.step - self.window_start_step
        self.sums.zero_()
        self.window_started, self.window_start_step = time.perf_counter(), self.step
        if bad != _NO_BAD_STEP:
            return int(bad)
        count = values.pop("steps") or 1.0
        row = {
            "step": self.step,
            "epoch": (self.step - 1) // self.env.steps_per_epoch + 1,
            **{name: total / count for name, total in values.items()},
            "augment_p": float(self.augment_p),
            "images_per_s": steps * self.global_batch / elapsed if elapsed > 0 else 0.0,
        }
        self.log_rows.append(row)
        self.pending_rows.append(row)
        if self.env.rank == 0:
            logger.info(
                "epoch %d/%d step %d/%d loss_d=%.4f loss_g=%.4f D(x)=%.3f D(G(z))=%.3f "
                "augment p=%.3f r_t=%.2f %.0f img/s",
                row["epoch"], self.cfg.train.epochs, self.step, self.total_steps,
                row["loss_d"], row["loss_g"], row["d_real"], row["d_fake"], row["augment_p"],
                row["ada_rt"], row["images_per_s"],
            )
        return None

    def _flush_rows(self) -> None:
        if self.env.rank == 0 and self.pending_rows:
            self.hooks.log_rows(self.pending_rows)
        if self.env.rank == 0 and self.pending_quality:
            self.hooks.log_quality(self.pending_quality)
        self.pending_rows, self.pending_quality = [], []

    def _quality_samples(self) -> torch.Tensor:
        """The generator evaluate will use, on the quality batch: the weight average with its
        statistics refreshed, else the raw generator with its running statistics."""
        if self.ema is None:
            # Full precision, as the evaluate stage draws them.
            return self._running_stats_samples(self.quality_noise, contextlib.nullcontext())
        self.ema_refreshed_at_step = self.step
        return self.ema.refresh_batchnorm(self.quality_noise)

    def _measure_quality(self) -> None:
        """Rank 0: quality of the current generator (a row), and the average's statistics."""
        if self.env.rank != 0 or (self.probe is None and self.ema is None):
            return
        started = time.perf_counter()
        images = self._quality_samples()
        if self.probe is not None:
            row = {"step": self.step, "epoch": (self.step - 1) // self.env.steps_per_epoch + 1,
                   "images_seen": self.step * self.global_batch, **self.probe.measure(images)}
            self.quality_rows.append(row)
            self.pending_quality.append(row)
            logger.info("step %d: fid_classifier=%.2f, %d classes hit", self.step,
                        row["fid_classifier"], row["classes_hit"])
        self.quality_s += time.perf_counter() - started

    def _at_quality_point(self, at_epoch_end: bool) -> bool:
        every = self.cfg.train.eval_every_images
        if not every:
            return at_epoch_end
        images = self.step * self.global_batch
        return images // every > (images - self.global_batch) // every

    def _running_stats_samples(
        self, noise: torch.Tensor, precision: contextlib.AbstractContextManager[Any]
    ) -> torch.Tensor:
        """The generator's samples of `noise` with its running BN statistics (eval mode: no
        collective, no RNG draw, no buffer update, so resuming stays exact)."""
        model = unwrap(self.generator)
        model.eval()
        with torch.no_grad(), precision:
            images = model(noise).float().clamp(-1, 1)
        model.train()
        return images

    def _initial_grid(self) -> None:
        """Rank 0 of a fresh run, before the first step: the untrained generator's samples, so
        that the UI's image slider opens (at step 0) on an image. Not kept: grid files are per
        epoch."""
        if self.initial_samples is not None:
            self.hooks.publish_grid(0, 0, self.initial_samples)
            self.initial_samples = None

    def _epoch_grid(self, epoch: int) -> None:
        """Rank 0: the fixed-noise samples at the end of `epoch`, kept and published."""
        if self.env.rank != 0:
            return
        images = self._running_stats_samples(self.fixed_noise, self.autocast)
        self.grids.append(to_uint8(images).cpu())
        self.hooks.publish_grid(epoch, self.step, images)

    def snapshot(self, rng_by_rank: dict[str, torch.Tensor]) -> checkpoints.TrainState:
        """The full train state (rank 0): plain state dicts, optimizers, progress, RNGs."""
        if self.ema is not None and self.ema_refreshed_at_step != self.step:
            self.ema_refreshed_at_step = self.step
            self.ema.refresh_batchnorm(self.quality_noise)
        return {
            "format": checkpoints.FORMAT_VERSION,
            "generator": {k: v.cpu() for k, v in unwrap(self.generator).state_dict().items()},
            "generator_ema": self.ema.state_dict() if self.ema is not None else None,
            "discriminator": {
                k: v.cpu() for k, v in unwrap(self.discriminator).state_dict().items()
            },
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "epoch": self.step // self.env.steps_per_epoch,
            "images_seen": self.step * self.global_batch,
            "fixed_noise": self.fixed_noise.cpu(),
            "augment": {"p": self.augment_p.cpu(), "ada_sums": self.ada_sums.cpu()},
            "rng": rng_by_rank,
            "config": dataclasses.asdict(self.cfg),
            "spec": self.spec.to_dict(),
            "world_size": self.env.world_size,
            "log_rows": list(self.log_rows),
            "quality_rows": list(self.quality_rows),
            "grids": list(self.grids),
            "resumed_from_steps": list(self.resumed_from_steps),
        }

    def _gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states, stacked by rank (a collective: all ranks call it)."""
        local = checkpoints.capture_rng(self.noise_rng, self.augment_rng)
        world_size = self.env.world_size
        return {key: torch.stack(all_gather(value, world_size)) for key, value in local.items()}

    def _checkpoint(self, extra_metrics: dict[str, Any]) -> None:
        rng = self._gather_rng()
        state = self.snapshot(rng) if self.env.rank == 0 else None
        metrics = {"step": self.step, "images_seen": self.step * self.global_batch, **extra_metrics}
        if self.log_rows:
            metrics.update({k: v for k, v in self.log_rows[-1].items() if k not in metrics})
        self.hooks.save_checkpoint(state, metrics)

    def _digests(self) -> list[str]:
        digest = param_sha256(self.generator, self.discriminator)
        return all_gather_hex(digest, self.env.world_size)

    # --- the run --------------------------------------------------------------------------------

    def _batches(self, source: BatchSource) -> Iterator[tuple[int, torch.Tensor]]:
        """(epoch, images) from the current step to the end, resuming mid-epoch exactly."""
        spe = self.env.steps_per_epoch
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, spe)
            for images, _labels in source(epoch, skip):
                yield epoch, images
            if self.step % spe:
                raise RuntimeError(
                    f"batch source ended early in epoch {epoch + 1} at step {self.step}"
                )

    def run(self, source: BatchSource) -> LoopResult:
        """Train from the current step to `epochs * steps_per_epoch`; checkpoint every
        `checkpoint_every_steps` and at the end. Stops early (without checkpoint) on a
        non-finite loss and says at which step in the result."""
        train, spe, device = self.cfg.train, self.env.steps_per_epoch, self.env.device
        batch_size, nz = train.batch_size, self.cfg.model.nz
        if self.resumed_from_steps and self.env.rank == 0:
            logger.info("resumed from checkpoint at step %d/%d", self.step, self.total_steps)
        result = LoopResult(0, 0, self.resumed_from_steps)
        self._initial_grid()
        for epoch, images in self._batches(source):
            self.hooks.before_step(self.step + 1)
            real = to_signed(placement.place_batch(images, device))
            noise = torch.randn(batch_size, nz, device=device, generator=self.noise_rng)
            self._step(real, noise)

            step = self.step
            at_end = step == self.total_steps
            at_checkpoint = step % train.checkpoint_every_steps == 0 or at_end
            at_epoch_end = step % spe == 0
            if step % train.log_every_steps == 0 or at_checkpoint or at_epoch_end:
                bad_step = self._sync_window()
                if bad_step is not None:
                    logger.error("non-finite loss at step %d: stopping", bad_step)
                    result.nonfinite_step = bad_step
                    break
            if at_epoch_end:
                self._epoch_grid(epoch + 1)
            if at_end or self._at_quality_point(at_epoch_end):
                self._measure_quality()
            if at_checkpoint or at_epoch_end:
                self._flush_rows()
            if at_checkpoint:
                digests = self._digests() if at_end else []
                result.param_sha256_by_rank = digests
                self._checkpoint({"params_identical": len(set(digests)) == 1} if at_end else {})

        result.steps = self.step if result.nonfinite_step is None else result.nonfinite_step - 1
        result.images_seen = result.steps * self.global_batch
        result.resumed_from_steps = list(self.resumed_from_steps)
        result.quality_s = self.quality_s
        return result
