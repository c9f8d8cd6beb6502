"""Sharding: the product's `prepare`, 1 vs 2 processes, 1 vs 2 Ray nodes, and its peak memory.

Throughput runs on a generated folder of `--images` (default 20,000) smooth synthetic images
of `--source-px` (40) in 10 class sub-folders, so `prepare` does its full work: list, decode,
convert, resize, re-encode, split, write shards, manifest and stats. Each side alternates with
the others per repeat, start-up included (the process pool, or connecting to Ray: part of what
a user waits for); a Ray cluster's own start-up is not. The Ray nodes are
`ray.cluster_utils.Cluster` nodes of one CPU each on this host, so 2 nodes vs 1 is the same
question as 2 processes vs 1, asked through Ray's scheduler and object store. The ceiling of
that question on the machine is measured alongside: equal pure-Python tasks in the same kind
of spawn pool, 1 vs 2 processes.

Memory runs `prepare` on `synthetic:N` sources (`--rss-images`, default 20,000 and 200,000)
and reports the peak RSS of the parent and of its largest pool process.

    python -m benchmarks.sharding [--quick] [--images 20000] [--repeats 2]
        [--processes 1 2] [--ray-nodes 1 2] [--rss-images 20000 200000]
        [--source-px 40] [--source-format png|jpeg] [--image-size 32] [--channels 1]
"""

from __future__ import annotations

import argparse
import json
import os
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

# Run in a fresh interpreter: the spawn pool re-imports the parent's __main__, and this module's
# imports (torch, via benchmarks.common) would slow every pool process down unlike production.
# argv: the DataConfig fields as JSON, the output root, the number of Ray nodes (0 = no Ray).
_PREPARE = """
import json, resource, sys, time
from pipeline.core.config import DataConfig
from pipeline.core.layout import Layout
from pipeline.data.prepare import prepare_dataset
cfg, root, nodes = DataConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
if nodes:
    import os
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
started = time.perf_counter()
stats = prepare_dataset(cfg, Layout(root))
elapsed = time.perf_counter() - started
if nodes:
    import ray
    ray.shutdown()
    cluster.shutdown()
print(json.dumps({"elapsed_s": elapsed, "images": stats.samples,
                  "rss_parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_child_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_prepare(data: dict[str, Any], workdir: Path, ray_nodes: int = 0) -> dict[str, float]:
    """`prepare_dataset` with DataConfig fields `data` in a fresh interpreter: its seconds,
    images and peak RSS (MiB) of the parent and of its largest child process."""
    root = Path(tempfile.mkdtemp(prefix="prepare_", dir=workdir))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PREPARE, json.dumps(data), str(root), str(ray_nodes)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600,
        )
    finally:
        shutil.rmtree(root)
    if done.returncode != 0:
        raise RuntimeError(f"prepare failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# The ceiling of the 2-processes question on this machine: equal pure-Python tasks in the same
# kind of spawn pool, no I/O, nothing serial but the pool's start-up.
_SPIN = """
import multiprocessing, sys, time
def spin(n):
    total = 0
    for i in range(n):
        total += i * i
    return total
if __name__ == "__main__":
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(int(sys.argv[1])) as pool:
        pool.map(spin, [10_000_000] * 8, chunksize=1)
    print(8 / (time.perf_counter() - started))
"""


def spin_tasks_per_s(processes: int) -> float:
    """Tasks/s of 8 equal CPU-bound tasks in a spawn pool of `processes`."""
    with tempfile.NamedTemporaryFile("w", suffix=".py") as script:
        script.write(_SPIN)
        script.flush()
        done = subprocess.run([sys.executable, script.name, str(processes)],
                              capture_output=True, text=True, check=True, timeout=600)
    return float(done.stdout.strip())


def images_per_s(data: dict[str, Any], workdir: Path, ray_nodes: int = 0) -> float:
    outcome = run_prepare(data, workdir, ray_nodes)
    return outcome["images"] / outcome["elapsed_s"]


def throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Images/s of each local process count and each Ray node count, alternating per repeat."""
    started = time.perf_counter()
    folder = make_image_folder(workdir / "images", args.images, args.source_px, 3,
                               fmt=args.source_format)
    print(f" sharding: generated {args.images} {args.source_format} images of "
          f"{args.source_px} px in {time.perf_counter() - started:.0f} s", flush=True)
    data = {"source": str(folder), "image_size": args.image_size, "channels": args.channels}
    sides = {f"processes={n}": lambda n=n: images_per_s(
        {**data, "backend": "local", "num_processes": n}, workdir) for n in args.processes}
    sides |= {f"ray_nodes={n}": lambda n=n: images_per_s(
        {**data, "backend": "ray"}, workdir, ray_nodes=n) for n in args.ray_nodes}
    sides |= {f"ceiling_processes={n}": lambda n=n: spin_tasks_per_s(n) for n in args.processes}
    rates = interleaved(sides, args.repeats)
    results: dict[str, Any] = {
        "images": args.images, "source": f"{args.source_px} px {args.source_format}",
        "target": f"{args.image_size}x{args.image_size}x{args.channels}",
        **{name: summarise(values) for name, values in rates.items()},
    }
    for name in rates:
        unit = "tasks" if name.startswith("ceiling") else "images"
        print_row(f"prepare {unit}/s, {name}", results[name]["median"])
    for kind in ("processes", "ray_nodes", "ceiling_processes"):
        one, two = rates.get(f"{kind}=1"), rates.get(f"{kind}=2")
        if one and two:
            results[f"{kind}_speedup_2_vs_1"] = paired_ratio(two, one)
            print_row(f"{kind}: 2 / 1", results[f"{kind}_speedup_2_vs_1"])
    return results


def peak_memory(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Peak RSS of `prepare` on `synthetic:N` for each N, with the default local backend."""
    results: dict[str, Any] = {}
    for count in args.rss_images:
        outcome = run_prepare({"source": f"synthetic:{count}", "image_size": args.image_size,
                               "channels": args.channels, "backend": "local",
                               "num_processes": max(args.processes)}, workdir)
        results[f"synthetic:{count}"] = {key: round(value, 1) for key, value in outcome.items()}
        print_row(f"peak RSS MiB parent / largest child, synthetic:{count}",
                  f"{outcome['rss_parent_mib']:.0f} / {outcome['rss_child_mib']:.0f} "
                  f"({outcome['images'] / outcome['elapsed_s']:.0f} img/s)")
    if len(args.rss_images) >= 2:
        small, large = (results[f"synthetic:{n}"] for n in (min(args.rss_images),
                                                            max(args.rss_images)))
        for who in ("parent", "child"):
            ratio = round(large[f"rss_{who}_mib"] / small[f"rss_{who}_mib"], 3)
            results[f"rss_{who}_largest_vs_smallest"] = ratio
            print_row(f"peak RSS of the {who}, largest / smallest source", ratio)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as workdir:
        results = throughput(args, Path(workdir))
        if args.rss_images:
            results["memory"] = peak_memory(args, Path(workdir))
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true",
                     help="2,000 images, one repeat, memory at 2,000 and 20,000")
    cli.add_argument("--images", type=int, default=20_000)
    cli.add_argument("--repeats", type=int, default=2)
    cli.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    cli.add_argument("--ray-nodes", nargs="*", type=int, default=[1, 2])
    cli.add_argument("--rss-images", nargs="*", type=int, default=[20_000, 200_000])
    cli.add_argument("--source-px", type=int, default=40)
    cli.add_argument("--source-format", choices=["png", "jpeg"], default="png")
    cli.add_argument("--image-size", type=int, default=32)
    cli.add_argument("--channels", type=int, choices=[1, 3], default=1)
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.images, args.repeats, args.rss_images = 2000, 1, [2000, 20_000]
    return args


def main() -> None:
    save_results("sharding", run(quick(parser().parse_args())))


if __name__ == "__main__":
    main()
