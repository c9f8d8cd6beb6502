"""Every benchmark in turn; prints each figure and ratio and writes benchmarks/results.json.

    python -m benchmarks.run_all [--quick] [--only train_step loader sharding ddp controller_poll
                                       decode_split]

--quick runs the same code paths with tiny settings (a smoke run, minutes); the figures in
BENCHMARKS.md come from the full run on a quiet machine. The GPU benchmark is separate:
benchmarks/gpu.sh, on an NVIDIA machine.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks import controller_poll, ddp, decode_split, loader, sharding, train_step
from benchmarks.common import RESULTS_PATH, machine, save_results

BENCHMARKS = {"train_step": train_step, "loader": loader, "sharding": sharding, "ddp": ddp,
              "controller_poll": controller_poll, "decode_split": decode_split}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    cli.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    options = cli.parse_args()
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    for name in options.only:
        module = BENCHMARKS[name]
        args = module.parser().parse_args(["--quick"] if options.quick else [])
        args = module.quick(args)
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        results = module.run(args)
        results["quick"] = options.quick
        results["wall_s"] = round(time.perf_counter() - started, 1)
        save_results(name, results)
        print(f"== {name}: {results['wall_s']} s", flush=True)
    print(f"results: {RESULTS_PATH}")


if __name__ == "__main__":
    main()
