"""Run a function on N local processes joined in a gloo process group, and find free ports.

The ranks are forked from one forkserver that imported torch and the library once (about 3 s
of imports per rank otherwise, on every call); each rank gets the caller's environment of the
moment, as a spawned one would.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from devtools.ports import free_port

# What every rank imports anyway: loaded once in the forkserver, shared by every fork.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "pipeline.train.loop", "devtools.gloo"]


def _gloo_rank(
    rank: int,
    world_size: int,
    port: int,
    results_dir: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    timeout_s: float | None,
    environ: dict[str, str],
) -> None:
    os.environ.clear()  # the forkserver's environment is the one of its start
    os.environ.update(environ)
    if sys.platform.startswith("linux"):
        # Loopback, not whatever interface the hostname resolves to (containers, VPNs).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # N ranks share a few cores: no oversubscription
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        **timeout,
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(results_dir) / f"rank{rank}.pt")
        dist.barrier()  # every rank done before any tears down
    finally:
        dist.destroy_process_group()
    # With torch 2.13 a rank sometimes aborts at interpreter exit, after all of this returned
    # ("terminate called without an active exception", no Python frame: a C++ thread of the
    # process group destroyed while joinable; about 1 run in 15). The result is saved: leave
    # without running the C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo_ranks(
    fn: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (),
    timeout_s: float | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes joined in a gloo
    process group on 127.0.0.1; return each rank's return value, by rank. `timeout_s` bounds
    every collective (a test of a would-be deadlock fails instead of hanging).

    For tests and benchmarks. `fn` must be importable (module level) and return what
    `torch.load(weights_only=True)` accepts (tensors, numbers, lists, dicts).
    """
    with tempfile.TemporaryDirectory(prefix="gloo_ranks_") as results_dir:
        torch.multiprocessing.start_processes(
            _gloo_rank,
            args=(world_size, free_port(), results_dir, fn, args, timeout_s, dict(os.environ)),
            nprocs=world_size,
            join=True,
            start_method=_start_method(),
        )
        return [
            torch.load(Path(results_dir) / f"rank{rank}.pt", weights_only=True)
            for rank in range(world_size)
        ]


def _start_method() -> str:
    """forkserver (preloaded) where there is one, else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(PRELOAD)
    return "forkserver"
