"""All-reduce through shared memory between CPU ranks of one machine: the same sums as gloo,
bit for bit, for SyncBatchNorm's statistics and for DDP's gradient buckets."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.distributed as dist

from devtools.gloo import run_gloo_ranks
from pipeline.train import shm_allreduce

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="shared-memory all-reduce runs on x86-64 only")


def _sums(rank: int, world_size: int) -> dict:
    generator = torch.Generator().manual_seed(rank)
    cases = {
        "stats_f64": torch.randn(257, dtype=torch.float64, generator=generator),
        "grads_f32": torch.randn(3, shm_allreduce.SLOT_VALUES + 123, generator=generator),
        "strided": torch.randn(64, 8, generator=generator).t(),  # not contiguous
    }
    channel = shm_allreduce.channel_for()
    out = {"has_channel": torch.tensor(channel is not None)}
    for name, tensor in cases.items():
        by_gloo = tensor.clone()
        dist.all_reduce(by_gloo)
        by_shm = tensor.clone()
        channel.all_reduce(by_shm)
        out[name] = torch.stack([by_gloo, by_shm]) if tensor.dim() == 1 else (by_gloo, by_shm)
    shm_allreduce.use_shared_memory(False)
    out["disabled"] = torch.tensor(shm_allreduce.channel_for() is None)
    shm_allreduce.use_shared_memory(True)
    return {key: value if not isinstance(value, tuple) else torch.stack(value)
            for key, value in out.items()}


def _ddp_grads(rank: int, world_size: int, use_shm: bool) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.ReLU(), torch.nn.Linear(300, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if use_shm:
        assert shm_allreduce.register_ddp_hook(ddp)
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    ddp(data).square().mean().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def test_sums_equal_gloos_bit_for_bit_on_every_rank():
    ranks = run_gloo_ranks(_sums, 2)
    for result in ranks:
        assert result["has_channel"] and result["disabled"]
        for name in ("stats_f64", "grads_f32", "strided"):
            by_gloo, by_shm = result[name]
            assert torch.equal(by_gloo, by_shm), name
    for name in ("stats_f64", "grads_f32", "strided"):  # every rank holds the same result
        assert torch.equal(ranks[0][name], ranks[1][name])


def test_a_ddp_hook_averages_gradients_as_gloo_does():
    with_gloo = run_gloo_ranks(_ddp_grads, 2, (False,))
    with_shm = run_gloo_ranks(_ddp_grads, 2, (True,))
    for rank in range(2):
        for name, grad in with_gloo[rank].items():
            torch.testing.assert_close(with_shm[rank][name], grad, rtol=0, atol=1e-7)
            assert torch.equal(with_shm[rank][name], with_shm[0][name])
