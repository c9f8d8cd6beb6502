"""Sharding throughput: the product's `prepare` on a generated folder of images, 1 vs 2 processes.

The folder holds `--images` (default 20,000) smooth synthetic PNGs of 40x40 RGB in 10 class
sub-folders, so `prepare` does its full work: list, decode, convert to grayscale, resize to 32,
re-encode, split, write shards, manifest and stats. Alternating repeats, process-pool start-up
included (it is part of what a user waits for).

    python -m benchmarks.sharding [--quick] [--images 20000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    interleaved,
    make_image_folder,
    paired_ratio,
    print_row,
    save_results,
    summarise,
)

SOURCE_SIDE_PX = 40


# Run in a fresh interpreter: the spawn pool re-imports the parent's __main__, and this module's
# imports (torch, via benchmarks.common) would slow every pool process down unlike production.
_PREPARE = """
import json, sys, time
from pathlib import Path
from pipeline.core.config import DataConfig
from pipeline.core.layout import Layout
from pipeline.data.prepare import prepare_dataset
cfg = DataConfig(source=sys.argv[1], image_size=32, channels=1, num_processes=int(sys.argv[3]))
started = time.perf_counter()
stats = prepare_dataset(cfg, Layout(sys.argv[2])).to_dict()
elapsed = time.perf_counter() - started
print(json.dumps({"elapsed_s": elapsed, "images": stats["splits"]["train"]["samples"]
                  + stats["splits"]["val"]["samples"]}))
"""


def prepare_images_per_s(folder: Path, workdir: Path, processes: int) -> float:
    """Images/s of `prepare_dataset` (pool start-up included, interpreter start-up not)."""
    root = Path(tempfile.mkdtemp(prefix=f"prepare_{processes}p_", dir=workdir))
    done = subprocess.run(
        [sys.executable, "-c", _PREPARE, str(folder), str(root), str(processes)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    shutil.rmtree(root)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome["images"] / outcome["elapsed_s"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as workdir:
        started = time.perf_counter()
        folder = make_image_folder(Path(workdir) / "images", args.images, SOURCE_SIDE_PX, 3)
        print(f" sharding: generated {args.images} PNGs in {time.perf_counter() - started:.0f} s")
        rates = interleaved({
            f"processes={n}": lambda n=n: prepare_images_per_s(folder, Path(workdir), n)
            for n in args.processes
        }, args.repeats)
    results: dict[str, Any] = {
        "images": args.images, "source_px": SOURCE_SIDE_PX, "target": "32x32x1",
        **{name: summarise(values) for name, values in rates.items()},
    }
    for name in rates:
        print_row(f"prepare images/s, {name}", results[name]["median"])
    if {"processes=1", "processes=2"} <= rates.keys():
        results["speedup_2_vs_1"] = paired_ratio(rates["processes=2"], rates["processes=1"])
        print_row("2 processes / 1 process", results["speedup_2_vs_1"])
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="2,000 images, one repeat")
    cli.add_argument("--images", type=int, default=20_000)
    cli.add_argument("--repeats", type=int, default=2)
    cli.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.images, args.repeats = 2000, 1
    return args


def main() -> None:
    save_results("sharding", run(quick(parser().parse_args())))


if __name__ == "__main__":
    main()
