"""Time to quality: the classifier FID per epoch of one training configuration, in one process.

Runs the product's `TrainLoop` (1 worker, no Ray, the decoded-split cache) on the prepared
mnist5k shards of this repository with `-S key=value` overrides, and after every epoch
measures, with the product's quality probe (the classifier of `models/classifier`, N =
`eval.num_samples`): the last weights (running statistics) and weight averages of several
half-lives and ramp-ups (`--averages 10000:0.05,20000:0.2`; `half-life:ramp-up`, ramp-up 0 =
none). Probe time is excluded from the printed training time. Needs `dvc repro classifier`.

    python -m benchmarks.quality_sweep lr2e3 -S train.lr_g=0.002 -S train.lr_d=0.002
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import load_config
from pipeline.core.layout import Layout
from pipeline.core.records import DatasetStats
from pipeline.data import loader
from pipeline.data.cache import training_batches
from pipeline.data.reader import shard_urls
from pipeline.metrics.probe import QualityProbe, quality_reference
from pipeline.train import loop as training
from pipeline.train.ema import GeneratorEma

REPO_ROOT = Path(__file__).resolve().parents[1]


class RampedEma(GeneratorEma):
    """A weight average with its own ramp-up (the product's is EMA_RAMPUP)."""

    def __init__(self, generator: torch.nn.Module, half_life_images: int, global_batch: int,
                 rampup: float) -> None:
        super().__init__(generator, half_life_images, global_batch)
        self.rampup = rampup

    def decay(self, images_seen: int) -> float:
        half_life = float(self.half_life_images)
        if self.rampup:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (self.global_batch / max(half_life, 1e-8))


class SilentHooks:
    """LoopHooks that keep nothing: the sweep reads the models directly."""

    def before_step(self, step: int) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        pass

    def log_rows(self, rows: list[dict[str, float]]) -> None:
        pass

    def publish_grid(self, epoch: int, step: int, images: torch.Tensor) -> None:
        pass

    def log_quality(self, rows: list[dict[str, float]]) -> None:
        pass


class Sweep(training.TrainLoop):
    """The product's loop, measuring the last weights and several averages each epoch."""

    def __init__(self, *args: Any, averages: dict[str, tuple[int, float]], probe: QualityProbe,
                 name: str, d_norm: str = "batch", lr_decay: str = "none",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lr_decay = lr_decay
        if d_norm == "spectral":
            self._spectral_discriminator()
        self.base_lrs = [(group, group["lr"]) for opt in (self.opt_g, self.opt_d)
                         for group in opt.param_groups]
        self.sweep_probe, self.name = probe, name
        self.averages = {label: RampedEma(training.unwrap(self.generator), half_life,
                                          self.global_batch, rampup)
                         for label, (half_life, rampup) in averages.items()}
        self.rows: list[dict[str, Any]] = []
        self.started, self.probe_s = time.perf_counter(), 0.0

    def _spectral_discriminator(self) -> None:
        """An experiment: D with spectral normalisation instead of BatchNorm (SNGAN)."""
        discriminator = training.unwrap(self.discriminator)
        for parent in discriminator.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(parent, child_name, torch.nn.Identity())
                elif isinstance(child, (torch.nn.Conv2d, torch.nn.Linear)):
                    setattr(parent, child_name,
                            torch.nn.utils.parametrizations.spectral_norm(child))
        train = self.cfg.train
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=train.lr_d,
                                      betas=(train.beta1, train.beta2))

    def _lr_factor(self) -> float:
        """An experiment: `linear:F` holds lr until fraction F of the run, then to 0;
        `cosine` follows a half cosine from 1 to 0 over the run."""
        progress = self.step / self.total_steps
        if self.lr_decay.startswith("linear:"):
            hold = float(self.lr_decay.split(":")[1])
            return 1.0 if progress < hold else (1.0 - progress) / (1.0 - hold)
        if self.lr_decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _step(self, real: torch.Tensor, noise: torch.Tensor) -> None:
        factor = self._lr_factor()
        for group, base in self.base_lrs:
            group["lr"] = base * factor
        super()._step(real, noise)
        for average in self.averages.values():
            average.update(training.unwrap(self.generator), self.step * self.global_batch)

    def _epoch_grid(self, epoch: int) -> None:
        began = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch,
                               "train_s": round(began - self.started - self.probe_s, 1),
                               "augment_p": round(float(self.augment_p), 3)}
        generator = training.unwrap(self.generator).eval()
        with torch.no_grad():
            raw = generator(self.quality_noise).clamp(-1, 1)
        generator.train()
        row["last_weights"] = round(self.sweep_probe.measure(raw)["fid_classifier"], 2)
        for label, average in self.averages.items():
            images = average.refresh_batchnorm(self.quality_noise)
            row[label] = round(self.sweep_probe.measure(images)["fid_classifier"], 2)
        self.rows.append(row)
        print(self.name, json.dumps(row), flush=True)
        self.probe_s += time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    parser.add_argument("--averages", default="10000:0.05,20000:0.2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-norm", choices=("batch", "spectral"), default="batch",
                        help="an experiment: spectral normalisation in D instead of BatchNorm")
    parser.add_argument("--lr-decay", default="none",
                        help="an experiment: none | linear:F (hold to fraction F) | cosine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout = Layout(REPO_ROOT)
    cfg = load_config(REPO_ROOT / "params.yaml", args.overrides)
    reference, why = quality_reference(cfg, layout)
    if reference is None:
        raise SystemExit(why)
    stats = DatasetStats.load(layout)
    train_count = stats.split_samples("train")
    steps = loader.steps_per_epoch(train_count, cfg.train.batch_size, 1)
    averages = {spec: (int(spec.split(":")[0]), float(spec.split(":")[1]))
                for spec in args.averages.split(",")}
    env = training.LoopEnv(0, 1, torch.device("cpu"), steps)
    sweep = Sweep(cfg, env, SilentHooks(), averages=averages, name=args.name,
                  probe=QualityProbe(reference, torch.device("cpu")), d_norm=args.d_norm,
                  lr_decay=args.lr_decay)
    sweep.run(training_batches(
        shard_urls("train", layout.shards(cfg.train.shards)), cache="host",
        split_shape=(train_count, stats.channels, stats.image_size, stats.image_size),
        batch_size=cfg.train.batch_size, rank=0, world_size=1, num_batches=steps,
        seed=cfg.train.seed, device=torch.device("cpu"), decode_processes=1, loader_workers=1,
    ))
    print("FINAL", args.name, json.dumps(sweep.rows[-1]), flush=True)


if __name__ == "__main__":
    main()
