"""Where a 2 x 1 CPU step's time goes: ablations of the plain loop on the same cores.

Every side trains the same global batch for the same steps on in-memory uint8 batches (no
loader), alternating repeat by repeat:
  plain_1x2        one process, 2 torch threads, the whole batch (the reference)
  plain_1x1        one process, 1 thread, the whole batch: what one core computes alone
  local_2x1        2 processes x 1 thread, half the batch each, NO communication: the
                   parallel compute floor of 2 x 1 (each rank its own model)
  ddp_2x1          + DDP's gradient all-reduce over gloo (plain BatchNorm: per-rank statistics)
  ddp_syncbn_gloo  + the product's CpuSyncBatchNorm, every all-reduce over gloo (as before)
  ddp_syncbn_2x1   the same with the product's shared-memory all-reduces (statistics and
                   gradients) between ranks on one machine: the product's plain DDP
  product_2x1      `TrainLoop` (the product's loop, its logging window and NaN guard) on the
                   same 2 gloo ranks, DDP + SyncBatchNorm, no Ray
The differences between neighbours are the costs: threads vs processes, gradient all-reduce,
SyncBatchNorm's all-reduces, the product loop's own work.

    python -m benchmarks.cpu_split [--steps 60] [--repeats 3] [--global-batch 64] [--ngf 32]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmarks.common import bench_config, paired_ratio, print_row, save_results, summarise
from benchmarks.plain_loop import PlainDCGAN, random_batches
from devtools.gloo import run_gloo_ranks
from pipeline.core.config import Config
from pipeline.train import loop as training
from pipeline.train.collectives import no_forward_buffer_sync
from pipeline.train.shm_allreduce import register_ddp_hook, use_shared_memory
from pipeline.train.sync_bn import convert_sync_batchnorm

WORLD = 2
SIDES = ("plain_1x2", "plain_1x1", "local_2x1", "ddp_2x1", "ddp_syncbn_gloo", "ddp_syncbn_2x1",
         "product_2x1")


def _config(global_batch: int, ngf: int, world_size: int) -> Config:
    return bench_config(32, 1, ["train.epochs=1", f"train.batch_size={global_batch // world_size}",
                                f"model.ngf={ngf}", f"model.ndf={ngf}"])


def _timed(plain: PlainDCGAN, pool: list[torch.Tensor], steps: int, nz: int, seed: int,
           barrier: bool) -> float:
    plain.run(pool[:2], nz, seed=seed)  # warm-up: oneDNN primitives, allocator
    if barrier:
        torch.distributed.barrier()
    started = time.perf_counter()
    plain.run(itertools.islice(itertools.cycle(pool), steps), nz, seed=seed)
    if barrier:
        torch.distributed.barrier()
    return time.perf_counter() - started


def single_process(threads: int, global_batch: int, ngf: int, steps: int) -> float:
    """images/s of the plain loop in this process with `threads` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = _config(global_batch, ngf, 1)
        pool = random_batches(4, global_batch, 32, 1)
        seconds = _timed(PlainDCGAN(cfg), pool, steps, cfg.model.nz, 0, barrier=False)
    finally:
        torch.set_num_threads(previous)
    return steps * global_batch / seconds


class _DdpHooks:
    """`training.LoopHooks` on a plain gloo group: DDP, nothing persisted or logged."""

    def before_step(self, step: int) -> None:
        pass

    def save_checkpoint(self, state, metrics) -> None:
        pass

    def log_rows(self, rows) -> None:
        pass

    def log_quality(self, rows) -> None:
        pass

    def publish_grid(self, epoch, step, images) -> None:
        pass


def _rank(rank: int, world_size: int, side: str, global_batch: int, ngf: int,
          steps: int) -> float:
    """One gloo rank of a 2 x 1 side; returns the images/s of the whole group."""
    cfg = _config(global_batch, ngf, world_size)
    pool = random_batches(4, cfg.train.batch_size, 32, 1, seed=rank)
    if side == "product_2x1":
        return global_batch * steps / _product_seconds(cfg, rank, world_size, pool, steps)
    wrap = None
    if side == "ddp_2x1":
        def wrap(model):
            return torch.nn.parallel.DistributedDataParallel(model, **no_forward_buffer_sync())
    elif side in ("ddp_syncbn_gloo", "ddp_syncbn_2x1"):
        use_shared_memory(side == "ddp_syncbn_2x1")

        def wrap(model):
            model = convert_sync_batchnorm(model, torch.device("cpu"))
            ddp = torch.nn.parallel.DistributedDataParallel(model, **no_forward_buffer_sync())
            register_ddp_hook(ddp)
            return ddp
    plain = PlainDCGAN(cfg, wrap=wrap)
    seconds = _timed(plain, pool, steps, cfg.model.nz, rank, barrier=True)
    return global_batch * steps / seconds


def _product_seconds(cfg: Config, rank: int, world_size: int, pool: list[torch.Tensor],
                     steps: int) -> float:
    def source(epoch: int, skip: int):
        return ((pixels, None) for pixels in itertools.islice(itertools.cycle(pool),
                                                              steps - skip))

    warm = training.TrainLoop(cfg, training.LoopEnv(rank, world_size, torch.device("cpu"), 2),
                              _DdpHooks())
    warm.run(lambda epoch, skip: itertools.islice(source(epoch, skip), 2 - skip))
    loop = training.TrainLoop(cfg, training.LoopEnv(rank, world_size, torch.device("cpu"), steps),
                              _DdpHooks())
    torch.distributed.barrier()
    started = time.perf_counter()
    loop.run(source)
    torch.distributed.barrier()
    return time.perf_counter() - started


def two_processes(side: str, global_batch: int, ngf: int, steps: int) -> float:
    return min(run_gloo_ranks(_rank, WORLD, (side, global_batch, ngf, steps)))


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--steps", type=int, default=60)
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--global-batch", type=int, default=64)
    cli.add_argument("--ngf", type=int, default=32, help="ngf = ndf")
    args = cli.parse_args()
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        rates["plain_1x2"].append(single_process(2, args.global_batch, args.ngf, args.steps))
        rates["plain_1x1"].append(single_process(1, args.global_batch, args.ngf, args.steps))
        for side in SIDES[2:]:
            rates[side].append(two_processes(side, args.global_batch, args.ngf, args.steps))
    print(f" cpu split: global batch {args.global_batch}, ngf=ndf={args.ngf}, "
          f"{args.steps} steps x {args.repeats} repeats")
    results = {"global_batch": args.global_batch, "ngf": args.ngf, "steps": args.steps}
    for side in SIDES:
        results[side] = summarise(rates[side])
        ratio = paired_ratio(rates[side], rates["plain_1x2"])
        results[f"{side}_vs_plain_1x2"] = ratio
        print_row(f"{side:<16} images/s (vs plain_1x2)", f"{results[side]['median']:>8}  "
                                                          f"({ratio})")
    save_results(f"cpu_split_b{args.global_batch}_ngf{args.ngf}", results)


if __name__ == "__main__":
    main()

