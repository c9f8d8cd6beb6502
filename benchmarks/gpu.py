"""GPU throughput (run by benchmarks/gpu.sh): the product's loop vs the plain loop on one CUDA GPU.

64x64x3 DCGAN, bf16 autocast, under NCCL at world size 1, placed and wrapped by the loop itself
(`pipeline.train.placement`: channels_last, fused Adam, no DDP wrapper at world size 1), as a
Ray Train GPU worker runs it, fed from shards that the product's `prepare` makes on the fly
from a synthetic image folder. Alternating repeats of:
  plain           `PlainDCGAN` (BatchNorm2d, no DDP), eager, GPU-resident uint8 batches
  plain_graph     the same with fused capturable Adam and the whole D+G step one CUDA graph
  product         `training.TrainLoop.run`, `train.compile=auto` (captured), the same batches
  product_eager   the same with `train.compile=off`
  product_ddp     the same wrapped in DDP (`train.gradient_allreduce=ddp`: eager, uncapturable)
  product_bucketed  captured with the bucketed gradient all-reduce in the graph (what `auto`
                  gives every rank of a multi-GPU run), over the world of one
  product_cache   captured, fed from the decoded split on the GPU (`pipeline.data.cache`)
  product_shards  captured, fed by the streaming shard loader (`--loader-workers` processes)
and the loader alone (shards -> batches, images/s). Every product side is also reported as a
ratio to the best plain side at the same batch. `--cache-images N` times the cache build (decode
N synthetic 64x64x3 images from shards onto the GPU). Prints one JSON summary; needs torch,
numpy, pillow, pyyaml, fsspec, tqdm, pandas + pyarrow (manifest) and webdataset + braceexpand,
but no Ray, MLflow, DVC or torchvision.

    python -m benchmarks.gpu [--steps 200] [--repeats 3] [--batch-size 128] [--output x.json]
        [--cache-images 200000]
"""

from __future__ import annotations

import argparse
import dataclasses
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
from pipeline.data.cache import CachedBatches, decode_split, training_batches
from pipeline.data.pixels import to_signed
from pipeline.data.reader import shard_urls
from pipeline.train import captured, placement
from pipeline.train import loop as training

DEVICE = torch.device("cuda", 0)
PRODUCT_SIDES = ("product", "product_eager", "product_ddp", "product_bucketed", "product_cache",
                 "product_shards")
STEP_MODES: dict[str, str] = {}  # which step each product variant ran, and why


def _timed_images_per_s(run, images: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return images / (time.perf_counter() - started)


def with_train(cfg: Config, **changes: Any) -> Config:
    """`cfg` with some `train` keys changed."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def product_images_per_s(cfg: Config, steps: int, source: training.BatchSource) -> float:
    """Images/s of `TrainLoop.run` for one epoch of `steps` (built, and captured, untimed)."""
    with tempfile.TemporaryDirectory(prefix="gpu_product_") as directory:
        env = training.LoopEnv(0, 1, DEVICE, steps_per_epoch=steps)
        loop = training.TrainLoop(cfg, env, LocalHooks(Path(directory)))
        variant = (f"compile={cfg.train.compile} "
                   f"gradients={loop.gradient_allreduce.mode}")
        STEP_MODES[variant] = f"{loop.step_mode} ({loop.step_mode_reason})"
        return _timed_images_per_s(lambda: loop.run(source), steps * cfg.train.batch_size)


def plain_images_per_s(cfg: Config, steps: int, pool: list[torch.Tensor]) -> float:
    plain = PlainDCGAN(cfg, DEVICE, channels_last=True)
    batches = itertools.islice(itertools.cycle(pool), steps)
    return _timed_images_per_s(lambda: plain.run(batches, cfg.model.nz),
                               steps * cfg.train.batch_size)


def plain_graph_images_per_s(cfg: Config, steps: int, pool: list[torch.Tensor]) -> float:
    """The plain loop with fused capturable Adam, its whole step one CUDA graph (recorded
    untimed, with the product's `captured.capture`), fed and noised as `PlainDCGAN.run` is."""
    plain = PlainDCGAN(cfg, DEVICE, channels_last=True, graph_safe=True)
    batch, nz = cfg.train.batch_size, cfg.model.nz
    state = captured.StepState((plain.generator, plain.discriminator), (plain.opt_g, plain.opt_d))
    step = captured.capture(lambda real, noise, _number, _draws: plain.step(real, noise), state,
                            (batch, *pool[0].shape[1:]), (batch, nz), DEVICE)
    noise_rng = torch.Generator(device=DEVICE).manual_seed(0)

    def run() -> None:
        for number, pixels in enumerate(itertools.islice(itertools.cycle(pool), steps), 1):
            real = to_signed(pixels.to(DEVICE, non_blocking=True))
            step(real, torch.randn(batch, nz, device=DEVICE, generator=noise_rng), number)

    return _timed_images_per_s(run, steps * batch)


def cache_source(cached: CachedBatches, steps: int) -> training.BatchSource:
    """One loop epoch of `steps` batches from the decoded split, running through as many of
    the cache's own epochs as it takes (a small split, long runs: no per-epoch grid costs)."""
    def source(epoch: int, skip: int):
        batches = (batch for cache_epoch in itertools.count() for batch in cached(cache_epoch))
        yield from itertools.islice(batches, skip, steps)
    return source


def device_cache(cfg: Config, urls: list[str]) -> CachedBatches:
    """The decoded train split on the GPU, as `train.data_cache=device` holds it."""
    pixels, _ = decode_split(urls, num_processes=os.cpu_count() or 1)
    num_batches = len(pixels) // cfg.train.batch_size
    return CachedBatches(pixels, None, batch_size=cfg.train.batch_size, rank=0, world_size=1,
                         num_batches=num_batches, seed=0, device=DEVICE, on_device=True)


def cache_build(count: int, workdir: Path) -> dict[str, Any]:
    """Seconds to decode `count` synthetic 64x64x3 images from shards into the GPU cache, as a
    worker does at the start of a run (making the images and shards is not timed)."""
    folder = make_image_folder(workdir / "cache_images", count, 64, 3)
    make_shards(workdir / "cache", str(folder), 64, 3, num_processes=os.cpu_count() or 1)
    urls = shard_urls("train", str(workdir / "cache" / "data" / "shards"))
    torch.cuda.synchronize()
    started = time.perf_counter()
    cached = training_batches(
        urls, cache="device", split_shape=(count, 3, 64, 64), batch_size=128, rank=0,
        world_size=1, num_batches=1, seed=0, device=DEVICE,
        decode_processes=os.cpu_count() or 1, loader_workers=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"images": cached.num_samples, "seconds": round(seconds, 2),
            "images_per_s": round(cached.num_samples / seconds), "processes": os.cpu_count()}


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
    placement.configure_process(DEVICE)  # as the Ray worker does
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEVICE)
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
        cached = device_cache(cfg, urls)
        eager = with_train(cfg, compile="off")
        ddp = with_train(cfg, gradient_allreduce="ddp")
        bucketed = with_train(cfg, gradient_allreduce="bucketed")
        warmup = 20
        plain_images_per_s(cfg, warmup, pool)
        product_images_per_s(cfg, warmup, memory_source(pool, warmup))
        steps = args.steps
        sides = {
            "plain": lambda: plain_images_per_s(cfg, steps, pool),
            "plain_graph": lambda: plain_graph_images_per_s(cfg, steps, pool),
            "product": lambda: product_images_per_s(cfg, steps, memory_source(pool, steps)),
            "product_eager": lambda: product_images_per_s(eager, steps,
                                                          memory_source(pool, steps)),
            "product_ddp": lambda: product_images_per_s(ddp, steps, memory_source(pool, steps)),
            "product_bucketed": lambda: product_images_per_s(bucketed, steps,
                                                             memory_source(pool, steps)),
            "product_cache": lambda: product_images_per_s(cfg, steps, cache_source(cached, steps)),
            "product_shards": lambda: product_images_per_s(
                cfg, steps, shard_source(cfg, urls, steps, pin_memory=True)),
            "loader": lambda: loader_images_per_s(cfg, urls, steps),
        }
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():
                rates[name].append(side())
        results["fixed_costs_s"] = fixed_costs_s(
            cfg, pool, DEVICE, sync=torch.cuda.synchronize)
        if args.profile:
            profile_steps(cfg, pool)
        if args.long_steps:
            results["slope"] = per_step_ratio(cfg, pool, args.steps, args.long_steps)
        if args.cache_images:
            results["cache_build"] = cache_build(args.cache_images, Path(workdir))
    dist.destroy_process_group()
    results.update({f"{name}_images_per_s": summarise(values) for name, values in rates.items()})
    results["step_modes"] = dict(STEP_MODES)
    results.update(ratios(results))
    results["raw"] = rates
    return results


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every product side / the best plain side (and / the captured plain), medians."""
    median = {name: results[f"{name}_images_per_s"]["median"]
              for name in ("plain", "plain_graph", *PRODUCT_SIDES, "loader")}
    best = max(median["plain"], median["plain_graph"])
    found = {"best_plain": "plain_graph" if median["plain_graph"] >= median["plain"] else "plain",
             "ratio_plain_graph_vs_plain": round(median["plain_graph"] / median["plain"], 3),
             "ratio_loader_vs_product": round(median["loader"] / median["product"], 3)}
    for name in PRODUCT_SIDES:
        found[f"ratio_{name}_vs_best_plain"] = round(median[name] / best, 3)
    return found


def print_summary(results: dict[str, Any]) -> None:
    """The ratios a reader compares, one per line (stderr: stdout is the JSON)."""
    print(f"batch {results['batch_size']}, best plain = {results['best_plain']}",
          file=sys.stderr)
    for key, value in sorted(results.items()):
        if key.startswith("ratio_"):
            print(f"  {key:<44} {value}", file=sys.stderr)
    for variant, mode in results["step_modes"].items():
        print(f"  step {variant}: {mode}", file=sys.stderr)
    if "cache_build" in results:
        print(f"  cache build: {results['cache_build']}", file=sys.stderr)


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
    cli.add_argument("--cache-images", type=int, default=0,
                     help="also time the device-cache build for N synthetic 64x64x3 images "
                          "(e.g. 200000; 0: skip)")
    cli.add_argument("--output", default="", help="also write the JSON summary here")
    args = cli.parse_args()
    results = run(args)
    print_summary(results)
    text = json.dumps(results, indent=2, sort_keys=True)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
