"""Ray Train's controller poll: what a fit with frequent checkpoint reports costs at Ray's 2 s
poll and at the pipeline's 0.25 s (`ray_runner.CONTROLLER_POLL_S`), against the same work
without Ray.

A worker's report waits until the controller has collected its previous one (a queue of one,
collected at each poll), and a fit spends a few polls starting and ending. Each side runs the
same worker function: `--reports` checkpoint reports, `--work-s` of torch matmuls before each
(a GPU run at 4 ms a step with `train.checkpoint_every_steps=200` reports every 0.8 s):
  plain      the function in this process, reports as no-ops (the reference)
  ray_2s     TorchTrainer.fit, one worker, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2 (Ray's default)
  ray_0.25s  the same at the pipeline's poll
Sides alternate repeat by repeat on one local Ray cluster.

    python -m benchmarks.controller_poll [--quick] [--reports 8] [--work-s 0.8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    interleaved,
    machine,
    paired_ratio,
    print_row,
    save_results,
    summarise,
    timed,
)
from pipeline.train.ray_runner import CONTROLLER_POLL_ENV, CONTROLLER_POLL_S


def _work(seconds: float) -> None:
    """Busy torch compute for about `seconds` (a stand-in for training steps)."""
    a = torch.randn(256, 256)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)


def _report(directory: str) -> None:
    import ray.train

    ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def worker(config: dict[str, Any]) -> None:
    """Work, then report a small checkpoint; `config["report"]` False: no Ray at all."""
    torch.set_num_threads(1)
    for index in range(config["reports"]):
        _work(config["work_s"])
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "state.txt").write_text(str(index))
            if config["report"]:
                _report(directory)


def _fit(args: argparse.Namespace, poll_s: str, root: Path) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ[CONTROLLER_POLL_ENV] = poll_s  # the driver propagates it to the controller
    trainer = TorchTrainer(
        worker, train_loop_config={"report": True, "reports": args.reports, "work_s": args.work_s},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(storage_path=str(root), name=f"poll-{poll_s}-{time.time_ns()}"),
    )
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    plain_config = {"report": False, "reports": args.reports, "work_s": args.work_s}
    ours = f"ray_{CONTROLLER_POLL_S}s"
    try:
        with tempfile.TemporaryDirectory(prefix="controller_poll_") as root:
            seconds = interleaved({
                "plain": lambda: timed(lambda: worker(plain_config)),
                "ray_2s": lambda: _fit(args, "2", Path(root)),
                ours: lambda: _fit(args, CONTROLLER_POLL_S, Path(root)),
            }, args.repeats)
    finally:
        ray.shutdown()
    results: dict[str, Any] = {
        "machine": machine(), "reports": args.reports, "work_s": args.work_s,
        **{f"{name}_s": summarise(values) for name, values in seconds.items()},
        "ray_2s_over_plain": paired_ratio(seconds["ray_2s"], seconds["plain"]),
        f"{ours}_over_plain": paired_ratio(seconds[ours], seconds["plain"]),
        f"ray_2s_over_{ours}": paired_ratio(seconds["ray_2s"], seconds[ours]),
    }
    for name in seconds:
        print_row(f"{name} wall s (median)", results[f"{name}_s"]["median"])
    for key in ("ray_2s_over_plain", f"{ours}_over_plain", f"ray_2s_over_{ours}"):
        print_row(key, results[key])
    return results


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="few reports, one repeat")
    cli.add_argument("--reports", type=int, default=8)
    cli.add_argument("--work-s", type=float, default=0.8, help="work before each report")
    cli.add_argument("--repeats", type=int, default=2)
    return cli


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.reports, args.work_s, args.repeats = 3, 0.2, 1
    return args


def main() -> None:
    save_results("controller_poll", run(quick(parser().parse_args())))


if __name__ == "__main__":
    main()
