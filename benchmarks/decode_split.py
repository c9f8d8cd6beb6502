"""Decoding a train split into memory (`pipeline.data.cache.decode_split`, what every training
worker does at its start): one process against a spawned pool of two, for a small and a large
split, beside the number of processes the product now picks (`decode_process_count`).

A spawned process imports torch before its first image; below some split size the pool is
slower than decoding in the worker itself. Sides alternate repeat by repeat; ratios are paired.

    python -m benchmarks.decode_split [--quick] [--sizes 5000 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    interleaved,
    machine,
    make_shards,
    paired_ratio,
    print_row,
    save_results,
    summarise,
    timed,
)
from pipeline.core.records import DatasetStats
from pipeline.data.cache import decode_process_count, decode_split
from pipeline.data.reader import shard_urls


def _one_size(images: int, repeats: int, root: Path) -> dict[str, Any]:
    """Wall seconds of decoding `images` generated 32x32x1 samples with 1 and 2 processes."""
    stats = make_shards(root, f"synthetic:{images}", image_size=32, channels=1)
    urls = shard_urls("train", str(root / "data" / "shards"))
    seconds = interleaved({
        "one_process": lambda: timed(lambda: decode_split(urls, num_processes=1)),
        "two_processes": lambda: timed(lambda: decode_split(urls, num_processes=2)),
    }, repeats)
    samples = DatasetStats.from_dict(stats).split_samples("train")
    result = {
        "train_samples": samples, "shards": len(urls),
        **{f"{name}_s": summarise(values) for name, values in seconds.items()},
        "two_over_one_process_s": paired_ratio(seconds["two_processes"], seconds["one_process"]),
        "product_processes_of_2": decode_process_count(samples, 2),
    }
    for key in ("one_process_s", "two_processes_s"):
        print_row(f"{samples} samples: {key} (median)", result[key]["median"])
    print_row(f"{samples} samples: two_over_one_process_s", result["two_over_one_process_s"])
    print_row(f"{samples} samples: product picks", result["product_processes_of_2"])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine()}
    for images in args.sizes:
        with tempfile.TemporaryDirectory(prefix="decode_split_") as root:
            results[f"images_{images}"] = _one_size(images, args.repeats, Path(root))
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="one small size, one repeat")
    cli.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000])
    cli.add_argument("--repeats", type=int, default=3)
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.sizes, args.repeats = [1_000], 1
    return args


def main() -> None:
    save_results("decode_split", run(quick(parser().parse_args())))


if __name__ == "__main__":
    main()
