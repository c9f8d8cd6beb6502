"""Training step throughput: the product's loop (1 worker) vs the plain loop, same process.

For each data shape (32x32x1, 64x64x3) and precision (fp32, bf16), alternating repeat by repeat:
  plain      `PlainDCGAN` on in-memory batches (the reference)
  product    `training.TrainLoop.run` on the same in-memory batches, with its real per-run
             work: log windows every `train.log_every_steps`, the epoch grid, and a checkpoint
             written to disk at the end (Ray's `report` is replaced by `checkpoints.save_state`)
  product+shards  the same, fed by `data.train_batches` from shards made by `prepare` (decode
             in `train.loader_workers` processes, as in production)
Same architecture, batch size, thread count and seed. Goals: product/plain >= 0.95 in fp32;
bf16 >= 1.6x fp32 where the CPU has AVX512-BF16 or AMX.

    python -m benchmarks.train_step [--quick] [--threads 1] [--steps 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    SHAPES,
    bench_config,
    has_fast_bf16,
    interleaved,
    machine,
    make_image_folder,
    make_shards,
    paired_ratio,
    print_row,
    save_results,
    summarise,
)
from benchmarks.plain_loop import PlainDCGAN, random_batches
from pipeline.core.config import Config
from pipeline.data import loader as data
from pipeline.data.grids import save_grid
from pipeline.data.pixels import to_signed
from pipeline.data.reader import shard_urls
from pipeline.train import checkpoints
from pipeline.train import loop as training

CPU = torch.device("cpu")
POOL_BATCHES = 8  # distinct in-memory batches, cycled
RATIO_GOAL = 0.95
PRODUCTION_STEPS_PER_EPOCH = 140  # mnist5k: 4,500 train images / batch 32, one worker
BF16_GOAL = 1.6


class LocalHooks:
    """`training.LoopHooks` for one worker without Ray: what Ray's hooks do, on local disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log_path = directory / "train_log.csv"

    def before_step(self, step: int) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        if state is not None:
            checkpoints.save_state(state, self.directory / f"checkpoint_{metrics['step']:06d}")

    def log_rows(self, rows: list[dict[str, float]]) -> None:
        with self.log_path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=training.LOG_COLUMNS).writerows(rows)

    def publish_grid(self, epoch: int, step: int, images: torch.Tensor) -> None:
        save_grid(images, self.directory / f"epoch_{epoch:03d}.png", nrow=8)

    def log_quality(self, rows: list[dict[str, float]]) -> None:
        pass


def product_images_per_s(cfg: Config, steps: int, source: training.BatchSource) -> float:
    """Images/s of `TrainLoop.run` over `steps` steps (one epoch), built outside the timing."""
    with tempfile.TemporaryDirectory(prefix="bench_product_") as directory:
        env = training.LoopEnv(0, 1, torch.device("cpu"), steps_per_epoch=steps)
        loop = training.TrainLoop(cfg, env, LocalHooks(Path(directory)))
        started = time.perf_counter()
        result = loop.run(source)
        elapsed = time.perf_counter() - started
    assert result.steps == steps, result
    return steps * cfg.train.batch_size / elapsed


def fixed_costs_s(cfg: Config, pool: list[torch.Tensor], device: torch.device = CPU,
                  sync=lambda: None) -> dict[str, float]:
    """Seconds of the loop's work that is not a step, each timed alone (median of 3) on a
    warmed-up loop: a log window (every log_every_steps), the epoch grid (every epoch), a
    checkpoint (every checkpoint_every_steps) and the parameter digests (once, at the end)."""
    costs: dict[str, list[float]] = {"log_window": [], "epoch_grid": [], "checkpoint": [],
                                     "param_digests": []}
    with tempfile.TemporaryDirectory(prefix="bench_fixed_") as directory:
        env = training.LoopEnv(0, 1, device, steps_per_epoch=1000)
        loop = training.TrainLoop(cfg, env, LocalHooks(Path(directory)))
        noise = torch.randn(cfg.train.batch_size, cfg.model.nz, device=device)
        work = {"log_window": loop._sync_window, "epoch_grid": lambda: loop._epoch_grid(1),
                "checkpoint": lambda: loop._checkpoint({}), "param_digests": loop._digests}
        for _ in range(3):
            for name, action in work.items():
                loop._step(to_signed(pool[0].to(device)), noise)  # captured where it is
                sync()
                started = time.perf_counter()
                action()
                sync()
                costs[name].append(time.perf_counter() - started)
    return {name: round(sorted(values)[1], 4) for name, values in costs.items()}


def plain_images_per_s(cfg: Config, steps: int, pool: list[torch.Tensor]) -> float:
    """Images/s of the plain loop over `steps` steps of the cycled in-memory pool."""
    plain = PlainDCGAN(cfg)
    batches = itertools.islice(itertools.cycle(pool), steps)
    started = time.perf_counter()
    plain.run(batches, cfg.model.nz, cfg.train.seed)
    elapsed = time.perf_counter() - started
    return steps * cfg.train.batch_size / elapsed


def memory_source(pool: list[torch.Tensor], steps: int) -> training.BatchSource:
    def source(epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, None]]:
        for index in range(skip, steps):
            yield pool[index % len(pool)], None
    return source


def shard_source(cfg: Config, urls: list[str], steps: int,
                 pin_memory: bool = False) -> training.BatchSource:
    """The product's batch source, as `ray_train` builds it for one worker."""
    return data.EpochLoader(
        urls, batch_size=cfg.train.batch_size, rank=0, world_size=1, num_batches=steps,
        seed=cfg.train.seed, loader_workers=cfg.train.loader_workers, pin_memory=pin_memory,
    )


def shards_for(shape: str, workdir: Path, images: int) -> list[str]:
    """Train shard URLs of `shape` made by the product's `prepare` from a synthetic folder."""
    image_size, channels = SHAPES[shape]
    root = workdir / shape
    folder = make_image_folder(root / "images", images, image_size + 8, channels)
    make_shards(root, str(folder), image_size, channels)
    return shard_urls("train", str(root / "data" / "shards"))


def bench_shape(shape: str, precision: str, args: argparse.Namespace, urls: list[str]) -> dict:
    image_size, channels = SHAPES[shape]
    steps, repeats = args.steps, args.repeats
    if precision == "bf16" and not has_fast_bf16():
        # Emulated bf16 runs ~15x slower: fewer steps tell the same story in bearable time.
        steps, repeats = max(2, steps // 8), min(repeats, 2)
    cfg = bench_config(image_size, channels, [f"train.precision={precision}",
                                              f"train.cpus_per_worker={args.threads}",
                                              "train.epochs=1"])
    pool = random_batches(POOL_BATCHES, cfg.train.batch_size, image_size, channels)
    warmup = max(1, steps // 10)
    plain_images_per_s(cfg, warmup, pool)  # oneDNN primitives, allocator: once per process
    product_images_per_s(cfg, warmup, memory_source(pool, warmup))
    sides = {
        "plain": lambda: plain_images_per_s(cfg, steps, pool),
        "product": lambda: product_images_per_s(cfg, steps, memory_source(pool, steps)),
        "product_shards": lambda: product_images_per_s(
            cfg, steps, shard_source(cfg, urls, steps)
        ),
    }
    rates = interleaved(sides, repeats)
    row = {name: summarise(values) for name, values in rates.items()}
    row["ratio_product_vs_plain"] = paired_ratio(rates["product"], rates["plain"])
    row["ratio_product_shards_vs_plain"] = paired_ratio(rates["product_shards"], rates["plain"])
    row["raw"] = rates
    row["batch_size"], row["loader_workers"] = cfg.train.batch_size, cfg.train.loader_workers
    row["steps"], row["repeats"] = steps, repeats
    row["fixed_costs_s"] = fixed_costs_s(cfg, pool)
    step_s = cfg.train.batch_size / row["plain"]["median"]
    # What those costs add per step at the product's cadence (params.yaml), in plain steps.
    row["fixed_costs_per_step_vs_plain_step"] = round((
        row["fixed_costs_s"]["log_window"] / cfg.train.log_every_steps
        + row["fixed_costs_s"]["epoch_grid"] / PRODUCTION_STEPS_PER_EPOCH
        + row["fixed_costs_s"]["checkpoint"] / cfg.train.checkpoint_every_steps
    ) / step_s, 4)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All shapes x precisions; prints every figure and ratio; returns the results."""
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"train_step: {info['cpu_model']}, {args.threads} thread(s), flags {info['cpu_flags']}")
    results: dict[str, Any] = {"threads": args.threads, "steps": args.steps,
                               "repeats": args.repeats, "fast_bf16_cpu": has_fast_bf16()}
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as workdir:
        for shape in args.shapes:
            urls = shards_for(shape, Path(workdir), args.shard_images)
            for precision in args.precisions:
                row = bench_shape(shape, precision, args, urls)
                results[f"{shape}/{precision}"] = row
                print(f" {shape} {precision} (batch {row['batch_size']}):")
                for name in ("plain", "product", "product_shards"):
                    print_row(f"{name} images/s (median of {row['repeats']})",
                              row[name]["median"])
                print_row(f"product / plain (goal >= {RATIO_GOAL})",
                          row["ratio_product_vs_plain"])
                print_row("product+shards / plain", row["ratio_product_shards_vs_plain"])
                print_row("non-step work (s): window, grid, checkpoint, digests",
                          list(row["fixed_costs_s"].values()))
                print_row("  its cost per step at params.yaml cadence, in steps",
                          row["fixed_costs_per_step_vs_plain_step"])
            if {"fp32", "bf16"} <= set(args.precisions):
                fp32, bf16 = results[f"{shape}/fp32"], results[f"{shape}/bf16"]
                speedup = {
                    name: round(bf16[name]["median"] / fp32[name]["median"], 3)
                    for name in ("plain", "product")
                }
                results[f"{shape}/bf16_speedup"] = speedup
                goal = (f"goal >= {BF16_GOAL}" if has_fast_bf16()
                        else "no AVX512-BF16/AMX on this CPU: goal does not apply")
                print_row(f"{shape} bf16 / fp32 product ({goal})", speedup["product"])
                print_row(f"{shape} bf16 / fp32 plain", speedup["plain"])
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    cli.add_argument("--threads", type=int, default=1, help="torch threads (= cpus_per_worker)")
    cli.add_argument("--steps", type=int, default=PRODUCTION_STEPS_PER_EPOCH,
                     help="timed steps per repeat (one epoch: its grid, a checkpoint at the end)")
    cli.add_argument("--repeats", type=int, default=3, help="alternating repeats per side")
    cli.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    cli.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    cli.add_argument("--shard-images", type=int, default=1200, help="synthetic images to shard")
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    """Smoke settings: the same code paths, a fraction of the time."""
    if args.quick:
        args.steps, args.repeats, args.shard_images = 8, 2, 300
    return args


def main() -> None:
    args = quick(parser().parse_args())
    save_results("train_step", run(args))


if __name__ == "__main__":
    main()
