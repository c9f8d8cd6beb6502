"""torch.profiler op tables of the product loop and the plain loop (same steps, same batches).

    python -m benchmarks.profile_loop [--shape 32x32x1] [--precision fp32] [--steps 30]

Read the two tables side by side: anything the product adds (host syncs, copies, logging,
checkpoint work) shows up as rows or time the plain table does not have.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import SHAPES, bench_config
from benchmarks.plain_loop import PlainDCGAN, random_batches
from benchmarks.train_step import LocalHooks, memory_source
from pipeline.train import loop as training


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--shape", default="32x32x1", choices=list(SHAPES))
    cli.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    cli.add_argument("--steps", type=int, default=30)
    cli.add_argument("--threads", type=int, default=1)
    cli.add_argument("--rows", type=int, default=20)
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    image_size, channels = SHAPES[args.shape]
    cfg = bench_config(image_size, channels, ["train.epochs=1",
                                              f"train.precision={args.precision}"])
    pool = random_batches(8, cfg.train.batch_size, image_size, channels)

    def product() -> None:
        with tempfile.TemporaryDirectory() as directory:
            env = training.LoopEnv(0, 1, torch.device("cpu"), args.steps)
            loop = training.TrainLoop(cfg, env, LocalHooks(Path(directory)))
            loop.run(memory_source(pool, args.steps))

    def plain() -> None:
        batches = itertools.islice(itertools.cycle(pool), args.steps)
        PlainDCGAN(cfg).run(batches, cfg.model.nz)

    product()
    plain()  # warm-up: oneDNN primitives, allocator
    for name, work in (("product", product), ("plain", plain)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            work()
        print(f"===== {name}: {args.shape} {args.precision}, {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
