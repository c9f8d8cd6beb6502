"""Scaling: 2 Ray Train workers x 1 thread vs 1 worker x 2 threads, against the plain loop.

All sides train the same global batch (2 x train.batch_size) for the same number of steps:
  plain_1x2     `PlainDCGAN`, one process, 2 torch threads (the reference)
  gloo_2x1      the plain loop in 2 gloo processes, DDP + the product's CPU SyncBatchNorm and
                its shared-memory all-reduces: what DDP itself costs, without Ray
  ray_2x1       the product: `pipeline.train.train.run`, num_workers=2, cpus_per_worker=1
  ray_1x2       the product: num_workers=1, cpus_per_worker=2
Product runs are real stage runs (Ray Train, DDP, shards from `prepare`, MLflow on SQLite,
checkpoints, grids); their images/s is the steady state from the train log (every log window
but the first), and their fixed overhead is the run's wall time minus the time of its steps.
Goal: ray_2x1 / plain_1x2 >= 0.9. Also measured: Ray cluster start (ray.init) once.

    python -m benchmarks.ddp [--quick] [--epochs 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    bench_config,
    make_image_folder,
    make_shards,
    paired_ratio,
    print_row,
    save_results,
    summarise,
)
from benchmarks.plain_loop import PlainDCGAN, random_batches
from devtools.gloo import run_gloo_ranks
from pipeline.core.layout import Layout
from pipeline.train import ray_runner
from pipeline.train import train as train_stage
from pipeline.train.collectives import no_forward_buffer_sync
from pipeline.train.shm_allreduce import register_ddp_hook
from pipeline.train.sync_bn import convert_sync_batchnorm

GOAL = 0.9
WORLD = 2


def _overrides(args: argparse.Namespace, num_workers: int, root: Path) -> list[str]:
    batch = args.global_batch // num_workers
    return [
        f"train.num_workers={num_workers}", f"train.cpus_per_worker={WORLD // num_workers}",
        f"train.batch_size={batch}", f"train.epochs={args.epochs}",
        f"train.storage_path={root / 'ray_storage'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ]


def plain_images_per_s(args: argparse.Namespace, steps: int) -> float:
    torch.set_num_threads(WORLD)
    cfg = bench_config(32, 1, [f"train.batch_size={args.global_batch}"])
    pool = random_batches(4, args.global_batch, 32, 1)
    plain = PlainDCGAN(cfg)
    plain.run(pool[:2], cfg.model.nz)  # warm-up
    started = time.perf_counter()
    plain.run(itertools.islice(itertools.cycle(pool), steps), cfg.model.nz)
    return steps * args.global_batch / (time.perf_counter() - started)


def _plain_ddp_rank(rank: int, world_size: int, global_batch: int, steps: int) -> float:
    """One gloo rank of the plain loop under DDP + CpuSyncBatchNorm; its images/s share."""
    batch = global_batch // world_size
    cfg = bench_config(32, 1, [f"train.batch_size={batch}"])

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        model = convert_sync_batchnorm(model, torch.device("cpu"))
        ddp = torch.nn.parallel.DistributedDataParallel(model, **no_forward_buffer_sync())
        register_ddp_hook(ddp)
        return ddp

    plain = PlainDCGAN(cfg, wrap=wrap)
    pool = random_batches(4, batch, 32, 1, seed=rank)
    plain.run(pool[:2], cfg.model.nz, seed=rank)
    torch.distributed.barrier()
    started = time.perf_counter()
    plain.run(itertools.islice(itertools.cycle(pool), steps), cfg.model.nz, seed=rank)
    torch.distributed.barrier()
    return steps * global_batch / (time.perf_counter() - started)


def gloo_images_per_s(args: argparse.Namespace, steps: int) -> float:
    return min(run_gloo_ranks(_plain_ddp_rank, WORLD, (args.global_batch, steps)))


def ray_run(args: argparse.Namespace, num_workers: int, root: Path) -> dict[str, float]:
    """One real train-stage run; steady images/s, its steps' time and its fixed overhead."""
    cfg = bench_config(32, 1, _overrides(args, num_workers, root))
    started = time.perf_counter()
    record = train_stage.run(cfg, Layout(root)).to_dict()
    wall_s = time.perf_counter() - started
    with (root / "reports" / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    windows, previous = [], 0
    for row in rows:  # (images, seconds) of each log window
        images = (int(row["step"]) - previous) * args.global_batch
        windows.append((images, images / float(row["images_per_s"])))
        previous = int(row["step"])
    steady = windows[1:] or windows
    steps_s = sum(seconds for _, seconds in windows)
    return {
        "images_per_s": sum(i for i, _ in steady) / sum(s for _, s in steady),
        "wall_s": wall_s,
        "steps_s": steps_s,
        "fixed_overhead_s": wall_s - steps_s,
        "first_window_s": windows[0][1],
        "steps": record["steps"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as workdir:
        data_root = Path(workdir) / "data_root"
        folder = make_image_folder(Path(workdir) / "images", args.images, 40, 1)
        make_shards(data_root, str(folder), 32, 1)
        started = time.perf_counter()
        ray_runner.connect_ray()
        ray_start_s = time.perf_counter() - started
        rates: dict[str, list[float]] = {k: [] for k in ("plain_1x2", "gloo_2x1", "ray_2x1",
                                                          "ray_1x2")}
        runs: dict[str, list[dict]] = {"ray_2x1": [], "ray_1x2": []}
        steps = None
        for repeat in range(args.repeats):
            for name, workers in (("ray_2x1", 2), ("ray_1x2", 1)):
                root = Path(workdir) / f"{name}_{repeat}"
                (root / "data").mkdir(parents=True)
                for item in ("shards", "stats.json"):
                    (root / "data" / item).symlink_to(data_root / "data" / item)
                outcome = ray_run(args, workers, root)
                runs[name].append(outcome)
                rates[name].append(outcome["images_per_s"])
                steps = outcome["steps"]
                # The references right after each product run, under the same load.
                if name == "ray_2x1":
                    rates["plain_1x2"].append(plain_images_per_s(args, steps))
                    rates["gloo_2x1"].append(gloo_images_per_s(args, steps))
        import ray

        ray.shutdown()
    results: dict[str, Any] = {
        "global_batch": args.global_batch, "steps": steps, "ray_start_s": round(ray_start_s, 2),
        **{name: summarise(values) for name, values in rates.items()},
        "ratio_ray_2x1_vs_plain_1x2": paired_ratio(rates["ray_2x1"], rates["plain_1x2"]),
        "ratio_ray_1x2_vs_plain_1x2": paired_ratio(rates["ray_1x2"], rates["plain_1x2"]),
        "ratio_gloo_2x1_vs_plain_1x2": paired_ratio(rates["gloo_2x1"], rates["plain_1x2"]),
        "ray_runs": runs,
    }
    for name in ("ray_2x1", "ray_1x2"):
        results[f"{name}_fixed_overhead_s"] = summarise(
            [run["fixed_overhead_s"] for run in runs[name]])
    print(f" ddp: global batch {args.global_batch}, {steps} steps, Ray start {ray_start_s:.1f} s")
    for name in rates:
        print_row(f"{name} images/s", results[name]["median"])
    print_row(f"ray 2x1 / plain 1x2 (goal >= {GOAL})", results["ratio_ray_2x1_vs_plain_1x2"])
    print_row("ray 1x2 / plain 1x2", results["ratio_ray_1x2_vs_plain_1x2"])
    print_row("plain gloo DDP 2x1 / plain 1x2", results["ratio_gloo_2x1_vs_plain_1x2"])
    for name in ("ray_2x1", "ray_1x2"):
        print_row(f"{name} fixed overhead s (run wall - step time)",
                  results[f"{name}_fixed_overhead_s"]["median"])
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="tiny data, one repeat")
    cli.add_argument("--images", type=int, default=5000, help="synthetic images (4,500 train)")
    cli.add_argument("--epochs", type=int, default=2)
    cli.add_argument("--global-batch", type=int, default=64)
    cli.add_argument("--repeats", type=int, default=2)
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.images, args.epochs, args.repeats = 800, 1, 1
    return args


def main() -> None:
    save_results("ddp", run(quick(parser().parse_args())))


if __name__ == "__main__":
    main()
