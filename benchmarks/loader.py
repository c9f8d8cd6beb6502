"""Loader throughput: shards -> batches (the product) vs one PNG file per image (the usual way).

Both sides read the same training images, decode them to float32 (B, C, H, W) in [-1, 1] and
batch them, with the same batch size and the same number of loader processes, alternating
repeat by repeat:
  shards     `data.train_batches` over the train shards of `prepare` (tar read, shuffle buffer,
             PNG decode, normalise), one epoch's worth of batches, loader start-up included
  png_files  the same images written as individual .png files, read by a per-file
             `torch.utils.data.Dataset` with PIL through `DataLoader(shuffle=True)`
and against what training consumes (the plain loop's images/s at one thread, interleaved).
With loader processes, also `--epochs` short epochs in a row through one `data.EpochLoader`
(processes kept across epochs, as training runs) vs a fresh loader per epoch.
Goal: the shard loader on ONE core (loader_workers=0, one torch thread) >= 5x training.

    python -m benchmarks.loader [--quick] [--batches 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import (
    SHAPES,
    bench_config,
    interleaved,
    make_image_folder,
    make_shards,
    paired_ratio,
    print_row,
    save_results,
    summarise,
)
from benchmarks.plain_loop import PlainDCGAN, random_batches
from pipeline.data import loader as data
from pipeline.data.reader import read_shard, shard_urls

GOAL_VS_TRAINING = 5.0


class PngFiles(Dataset):
    """The standard per-file dataset: open, decode, to tensor, scale to [-1, 1]."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0)


def extract_pngs(urls: list[str], folder: Path) -> list[Path]:
    """Write every train sample's PNG member (the exact bytes in the shards) as a file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for url in urls:
        for sample in read_shard(url):
            path = folder / f"{sample['__key__'].replace('/', '_')}.png"
            path.write_bytes(sample["png"])
            files.append(path)
    return files


def shard_images_per_s(urls: list[str], batch_size: int, batches: int, workers: int) -> float:
    started = time.perf_counter()
    seen = sum(images.shape[0] for images, _ in data.train_batches(
        urls, batch_size=batch_size, rank=0, world_size=1, num_batches=batches, seed=0,
        epoch=0, loader_workers=workers))
    return seen / (time.perf_counter() - started)


def epochs_images_per_s(urls: list[str], batch_size: int, batches: int, epochs: int,
                        workers: int, persistent: bool) -> float:
    """`epochs` consecutive short epochs through one `EpochLoader`, as training asks for them:
    its loader processes kept across epochs (`persistent`) or started afresh each epoch."""
    loader = data.EpochLoader(urls, batch_size=batch_size, rank=0, world_size=1,
                              num_batches=batches, seed=0, loader_workers=workers,
                              persistent=persistent)
    started = time.perf_counter()
    seen = sum(images.shape[0] for epoch in range(epochs) for images, _ in loader(epoch))
    return seen / (time.perf_counter() - started)


def png_images_per_s(files: list[Path], batch_size: int, batches: int, workers: int) -> float:
    started = time.perf_counter()
    loader = DataLoader(PngFiles(files), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True)
    seen = sum(images.shape[0] for images in itertools.islice(loader, batches))
    return seen / (time.perf_counter() - started)


def training_images_per_s(shape: str, steps: int) -> float:
    """What one-thread training consumes: the plain loop's images/s (after a warm-up)."""
    image_size, channels = SHAPES[shape]
    cfg = bench_config(image_size, channels)
    pool = random_batches(4, cfg.train.batch_size, image_size, channels)
    plain = PlainDCGAN(cfg)
    plain.run(pool[:2], cfg.model.nz)
    started = time.perf_counter()
    plain.run(itertools.islice(itertools.cycle(pool), steps), cfg.model.nz)
    return steps * cfg.train.batch_size / (time.perf_counter() - started)


def bench_shape(shape: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    image_size, channels = SHAPES[shape]
    batch_size = bench_config(image_size, channels).train.batch_size
    root = workdir / shape
    folder = make_image_folder(root / "source", args.images, image_size + 8, channels)
    make_shards(root, str(folder), image_size, channels)
    urls = shard_urls("train", str(root / "data" / "shards"))
    files = extract_pngs(urls, root / "png_files")
    batches = min(args.batches, len(files) // batch_size)
    row: dict[str, Any] = {"images": len(files), "batch_size": batch_size, "batches": batches}
    for workers in args.workers:
        sides = {
            "shards": lambda w=workers: shard_images_per_s(urls, batch_size, batches, w),
            "png_files": lambda w=workers: png_images_per_s(files, batch_size, batches, w),
        }
        if workers == 0:  # the one-core goal: training interleaved with the loader
            sides["training"] = lambda: training_images_per_s(shape, args.steps)
        rates = interleaved(sides, args.repeats)
        row[f"workers={workers}"] = {
            **{name: summarise(values) for name, values in rates.items()},
            "ratio_shards_vs_png_files": paired_ratio(rates["shards"], rates["png_files"]),
        }
        if workers > 0:  # short epochs: what keeping the loader processes saves per epoch
            kept = {
                name: lambda w=workers, p=persistent: epochs_images_per_s(
                    urls, batch_size, args.epoch_batches, args.epochs, w, p)
                for name, persistent in (("kept", True), ("fresh", False))
            }
            epoch_rates = interleaved(kept, args.repeats)
            row[f"workers={workers}"]["short_epochs"] = {
                "epochs": args.epochs, "batches_per_epoch": args.epoch_batches,
                **{name: summarise(values) for name, values in epoch_rates.items()},
                "ratio_kept_vs_fresh": paired_ratio(epoch_rates["kept"], epoch_rates["fresh"]),
            }
        if workers == 0:
            row["training_images_per_s_1_thread"] = summarise(rates["training"])["median"]
            row["ratio_loader_1_core_vs_training"] = paired_ratio(
                rates["shards"], rates["training"])
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # one core: the loader's budget in the goal
    results: dict[str, Any] = {"repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as workdir:
        for shape in args.shapes:
            row = bench_shape(shape, args, Path(workdir))
            results[shape] = row
            print(f" loader {shape}: {row['images']} images, batch {row['batch_size']}")
            for workers in args.workers:
                cell = row[f"workers={workers}"]
                print_row(f"shards images/s, loader_workers={workers}", cell["shards"]["median"])
                print_row(f"png files images/s, num_workers={workers}",
                          cell["png_files"]["median"])
                print_row("shards / png files", cell["ratio_shards_vs_png_files"])
                if "short_epochs" in cell:
                    short = cell["short_epochs"]
                    print_row(f"{args.epochs} epochs x {args.epoch_batches} batches: kept "
                              "loader processes / fresh per epoch", short["ratio_kept_vs_fresh"])
            if "ratio_loader_1_core_vs_training" in row:
                print_row("training consumes (plain loop, 1 thread) images/s",
                          row["training_images_per_s_1_thread"])
                print_row(f"loader on 1 core / training (goal >= {GOAL_VS_TRAINING})",
                          row["ratio_loader_1_core_vs_training"])
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="few batches: a smoke run")
    cli.add_argument("--images", type=int, default=5000, help="synthetic images to shard")
    cli.add_argument("--batches", type=int, default=140, help="batches per timed epoch")
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--steps", type=int, default=30, help="training steps for its images/s")
    cli.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    cli.add_argument("--epochs", type=int, default=5, help="short epochs in a row")
    cli.add_argument("--epoch-batches", type=int, default=35, help="batches per short epoch")
    cli.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.images, args.batches, args.repeats, args.steps = 600, 10, 2, 5
        args.epochs, args.epoch_batches = 3, 5
    return args


def main() -> None:
    save_results("loader", run(quick(parser().parse_args())))


if __name__ == "__main__":
    main()
