"""GPU throughput (run by benchmarks/gpu.sh): the product's loop vs the plain loop on one CUDA GPU.

64x64x3 DCGAN, bf16 autocast, channels_last, native torch.nn.SyncBatchNorm under NCCL DDP
(world size 1, as one Ray Train GPU worker runs it), fed from shards that the product's
`prepare` makes on the fly from a synthetic image folder. Alternating repeats of:
  plain           `PlainDCGAN` (BatchNorm2d, no DDP), bf16 + channels_last, GPU-resident batches
  product         `training.TrainLoop.run` (SyncBatchNorm + DDP), the same GPU-resident batches
  product_shards  the same loop fed by `data.train_batches` (decode in `--loader-workers`)
and the loader alone (shards -> batches, images/s). Prints one JSON summary; needs torch, numpy,
pillow, pyyaml, fsspec, tqdm, pandas + pyarrow (manifest) and webdataset + braceexpand, but no
Ray, MLflow or DVC.

    python -m benchmarks.gpu [--steps 200] [--repeats 3] [--batch-size 128] [--output x.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import bench_config, make_image_folder, make_shards, summarise
from benchmarks.plain_loop import PlainDCGAN, random_batches
from benchmarks.train_step import LocalHooks, fixed_costs_s, memory_source, shard_source
from devtools.gloo import free_port
from pipeline.core.config import Config
from pipeline.data import loader as data
from pipeline.data.reader import shard_urls
from pipeline.train import loop as training
from pipeline.train.sync_bn import convert_sync_batchnorm

DEVICE = torch.device("cuda", 0)


class GpuHooks(LocalHooks):
    """LocalHooks with the GPU worker's wrapping: SyncBatchNorm, channels_last, DDP.

    `ddp=False` is what Ray's prepare_model does at world size 1 (no DDP wrapper);
    `ddp_kwargs` lets a variant try DDP options (e.g. gradient_as_bucket_view)."""

    def __init__(self, directory: Path, ddp: bool = True, **ddp_kwargs: Any) -> None:
        super().__init__(directory)
        self.ddp, self.ddp_kwargs = ddp, ddp_kwargs

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = convert_sync_batchnorm(model, DEVICE)
        model = model.to(DEVICE, memory_format=torch.channels_last)
        if not self.ddp:
            return model
        # broadcast_buffers=False: the name torch < 2.13 knows (2.13: forward_sync_buffers).
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[DEVICE.index], broadcast_buffers=False, **self.ddp_kwargs
        )


def _timed_images_per_s(run, images: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return images / (time.perf_counter() - started)


def product_images_per_s(cfg: Config, steps: int, source: training.BatchSource,
                         **hook_options: Any) -> float:
    with tempfile.TemporaryDirectory(prefix="gpu_product_") as directory:
        env = training.LoopEnv(0, 1, DEVICE, steps_per_epoch=steps)
        loop = training.TrainLoop(cfg, env, GpuHooks(Path(directory), **hook_options))
        return _timed_images_per_s(lambda: loop.run(source), steps * cfg.train.batch_size)


def plain_images_per_s(cfg: Config, steps: int, pool: list[torch.Tensor]) -> float:
    plain = PlainDCGAN(cfg, DEVICE, channels_last=True)
    batches = itertools.islice(itertools.cycle(pool), steps)
    return _timed_images_per_s(lambda: plain.run(batches, cfg.model.nz),
                               steps * cfg.train.batch_size)


def loader_images_per_s(cfg: Config, urls: list[str], batches: int) -> float:
    started = time.perf_counter()
    seen = sum(images.shape[0] for images, _ in data.train_batches(
        urls, batch_size=cfg.train.batch_size, rank=0, world_size=1, num_batches=batches,
        seed=0, epoch=0, loader_workers=cfg.train.loader_workers))
    return seen / (time.perf_counter() - started)


def per_step_ratio(cfg: Config, pool: list[torch.Tensor], short: int, long: int) -> dict:
    """Seconds per step from the slope between a short and a long run (fixed costs cancel)."""
    batch = cfg.train.batch_size
    seconds = {}
    for name, measure in (
        ("plain", lambda n: plain_images_per_s(cfg, n, pool)),
        ("product", lambda n: product_images_per_s(cfg, n, memory_source(pool, n))),
    ):
        short_s, long_s = (n * batch / measure(n) for n in (short, long))
        seconds[name] = {"per_step_ms": round((long_s - short_s) / (long - short) * 1e3, 3),
                         "fixed_s": round(short_s - short * (long_s - short_s) / (long - short), 3)}
    seconds["ratio_per_step_product_vs_plain"] = round(
        seconds["plain"]["per_step_ms"] / seconds["product"]["per_step_ms"], 3)
    return seconds


def profile_steps(cfg: Config, pool: list[torch.Tensor], steps: int = 30) -> None:
    """Print torch.profiler's top ops (CPU time: the GPU is launch-bound here) of both loops."""
    from torch.profiler import ProfilerActivity, profile

    for name, work in (
        ("plain", lambda: plain_images_per_s(cfg, steps, pool)),
        ("product", lambda: product_images_per_s(cfg, steps, memory_source(pool, steps))),
    ):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            work()
        print(f"===== profile: {name}, {steps} steps", file=sys.stderr)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25),
              file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.backends.cudnn.benchmark = True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEVICE)
    torch.cuda.set_device(DEVICE)
    cfg = bench_config(64, 3, [
        "train.precision=bf16", f"train.batch_size={args.batch_size}", "train.epochs=1",
        f"model.ngf={args.width}", f"model.ndf={args.width}",
        f"train.loader_workers={args.loader_workers}",
    ])
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(DEVICE), "torch": torch.__version__,
        "cuda": torch.version.cuda, "batch_size": args.batch_size, "width": args.width,
        "steps": args.steps, "repeats": args.repeats, "loader_workers": args.loader_workers,
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as workdir:
        started = time.perf_counter()
        folder = make_image_folder(Path(workdir) / "images", args.images, 72, 3)
        make_shards(Path(workdir), str(folder), 64, 3, num_processes=min(8, os.cpu_count() or 1))
        results["prepare_s"] = round(time.perf_counter() - started, 1)
        urls = shard_urls("train", str(Path(workdir) / "data" / "shards"))
        pool = [b.to(DEVICE) for b in random_batches(8, args.batch_size, 64, 3)]
        warmup = 20
        plain_images_per_s(cfg, warmup, pool)
        product_images_per_s(cfg, warmup, memory_source(pool, warmup))
        sides = {
            "plain": lambda: plain_images_per_s(cfg, args.steps, pool),
            "product": lambda: product_images_per_s(cfg, args.steps,
                                                    memory_source(pool, args.steps)),
            "product_shards": lambda: product_images_per_s(
                cfg, args.steps, shard_source(cfg, urls, args.steps, pin_memory=True)),
            "loader": lambda: loader_images_per_s(cfg, urls, args.steps),
            # Variants that locate the product's per-step cost on the GPU.
            "product_no_ddp": lambda: product_images_per_s(
                cfg, args.steps, memory_source(pool, args.steps), ddp=False),
            "product_bucket_view": lambda: product_images_per_s(
                cfg, args.steps, memory_source(pool, args.steps),
                gradient_as_bucket_view=True),
        }
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():
                rates[name].append(side())
        results["fixed_costs_s"] = fixed_costs_s(
            cfg, pool, DEVICE, GpuHooks, sync=torch.cuda.synchronize)
        if args.profile:
            profile_steps(cfg, pool)
        if args.long_steps:
            results["slope"] = per_step_ratio(cfg, pool, args.steps, args.long_steps)
    dist.destroy_process_group()
    results.update({f"{name}_images_per_s": summarise(values) for name, values in rates.items()})
    plain = results["plain_images_per_s"]["median"]
    results["ratio_product_vs_plain"] = round(results["product_images_per_s"]["median"] / plain, 3)
    results["ratio_product_shards_vs_plain"] = round(
        results["product_shards_images_per_s"]["median"] / plain, 3)
    for name in ("product_no_ddp", "product_bucket_view"):
        results[f"ratio_{name}_vs_plain"] = round(
            results[f"{name}_images_per_s"]["median"] / plain, 3)
    results["raw"] = rates
    return results


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=200)
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--batch-size", type=int, default=128)
    cli.add_argument("--width", type=int, default=64, help="ngf = ndf (DCGAN 64x64: 64)")
    cli.add_argument("--images", type=int, default=4000, help="synthetic images to shard")
    cli.add_argument("--loader-workers", type=int, default=8)
    cli.add_argument("--long-steps", type=int, default=1000,
                     help="second run length for the per-step slope (0: skip)")
    cli.add_argument("--profile", action="store_true", help="torch.profiler tables to stderr")
    cli.add_argument("--output", default="", help="also write the JSON summary here")
    args = cli.parse_args()
    results = run(args)
    text = json.dumps(results, indent=2, sort_keys=True)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
