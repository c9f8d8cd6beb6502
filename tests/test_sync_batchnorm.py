"""CpuSyncBatchNorm on real gloo ranks equals plain BatchNorm on the concatenated batch."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn

from devtools.gloo import run_gloo_ranks
from pipeline.models.dcgan import GeneratorSpec, build_discriminator, build_generator
from pipeline.train.sync_bn import (
    CpuSyncBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
CHANNELS = 3
STEPS = 2  # two training steps: running statistics must compound exactly like BatchNorm's


class Case(NamedTuple):
    sizes: tuple[int, int]  # batch size of each rank
    momentum: float | None = 0.1
    mean: float = 0.0  # of the input
    dtype: torch.dtype = torch.float64
    channels_last: bool = False


CASES = {
    "equal": Case((4, 4)),
    "unequal": Case((2, 5)),
    "cumulative": Case((3, 4), momentum=None),
    "channels_last": Case((3, 2), channels_last=True),
    # float32 with |mean| >> std: E[x²]-E[x]² accumulated in float32 is off by ~0.1 here,
    # and even float32 squares summed in float64 by ~3e-3; plain float32 BN by ~6e-5.
    "large_mean_fp32": Case((4, 3), mean=1000.0, dtype=torch.float32),
    # What a bf16-autocast conv hands over: bf16 in and out, float32 statistics.
    "bf16": Case((4, 4), mean=3.0, dtype=torch.bfloat16),
}
# Against a float64 reference on the same (rounded) inputs: float32 is about plain float32
# BN's own error; bf16 is the rounding of the bf16 output.
TOLERANCE = {
    torch.float64: TIGHT,
    torch.float32: {"rtol": 2e-4, "atol": 2e-4},
    torch.bfloat16: {"rtol": 1e-2, "atol": 2e-2},
}
# Running statistics are float32 buffers for float32 and bf16 input.
STATS_TOLERANCE = {**TOLERANCE, torch.bfloat16: TOLERANCE[torch.float32]}


def case_data(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and the upstream gradient of a case's step (same on every process)."""
    case = CASES[name]
    # Not hash(): string hashes differ between processes.
    gen = torch.Generator().manual_seed(100 * list(CASES).index(name) + step)
    shape = (sum(case.sizes), CHANNELS, 3, 5)
    x = case.mean + torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1.5)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    # Values the case's dtype holds exactly: the float64 reference sees the same numbers.
    return x.to(case.dtype).double(), grad_out.to(case.dtype).double()


def assert_close_as(got: torch.Tensor, expected: torch.Tensor, tolerance: dict) -> None:
    """assert_close after casting `got` (maybe float32) to the reference's dtype."""
    torch.testing.assert_close(got.to(expected.dtype), expected, **tolerance)


def rank_slice(name: str, rank: int) -> slice:
    sizes = CASES[name].sizes
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make_bn(cls: type[nn.Module], momentum: float | None) -> nn.Module:
    bn = cls(CHANNELS, momentum=momentum).double()  # float64 parameters: the reference
    with torch.no_grad():  # affine parameters away from the 1/0 defaults
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64))
    return bn


def run_steps(bn: nn.Module, name: str, part: slice, case: Case | None = None) -> list[dict]:
    """Train-mode forward/backward for every step, then one eval forward; what each gave.
    With `case` (the ranks), inputs in its dtype and memory format; without, float64 NCHW."""
    dtype = case.dtype if case else torch.float64
    memory_format = torch.channels_last if case and case.channels_last else torch.contiguous_format
    bn.to(torch.float32 if dtype == torch.bfloat16 else dtype)  # autocast keeps float32 params
    records = []
    for step in range(STEPS):
        x, grad_out = case_data(name, step)
        x = x[part].to(dtype, memory_format=memory_format).requires_grad_(True)
        bn.zero_grad()
        out = bn(x)
        assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
        out.backward(grad_out[part].to(dtype, memory_format=memory_format))
        records.append(
            {
                "out": out.detach(),
                "grad_input": x.grad,
                "grad_weight": bn.weight.grad.clone(),
                "grad_bias": bn.bias.grad.clone(),
                "running_mean": bn.running_mean.clone(),
                "running_var": bn.running_var.clone(),
                "num_batches_tracked": bn.num_batches_tracked.clone(),
            }
        )
    bn.eval()
    with torch.no_grad():
        x = case_data(name, STEPS)[0][part].to(dtype, memory_format=memory_format)
        records.append({"out": bn(x)})
    return records


def discriminator_step(x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_discriminator(4, 16, 1).double()
    return model, model(x)


def discriminator_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(6, 1, 16, 16, generator=gen, dtype=torch.float64)


def worker(rank: int, world_size: int) -> dict:
    """One gloo rank: its share of every case, and a synced discriminator's step."""
    results = {}
    for name, case in CASES.items():
        bn = make_bn(CpuSyncBatchNorm, case.momentum)
        results[name] = run_steps(bn, name, rank_slice(name, rank), case)
    x = discriminator_batch()[[slice(0, 2), slice(2, 6)][rank]]
    model, _ = discriminator_step(x)
    model = convert_sync_batchnorm(model, torch.device("cpu"))
    logits = model(x)
    logits.sum().backward()
    results["discriminator"] = {
        "logits": logits.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Every case run once on 2 spawned gloo ranks (one spawn for the whole module)."""
    return run_gloo_ranks(worker, 2)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_batchnorm_on_the_global_batch(two_ranks, name):
    case = CASES[name]
    reference = run_steps(make_bn(nn.BatchNorm2d, case.momentum), name, slice(None))
    parts = [rank_slice(name, rank) for rank in range(2)]
    tolerance, stats_tolerance = TOLERANCE[case.dtype], STATS_TOLERANCE[case.dtype]
    for step, expected in enumerate(reference):
        for rank, part in enumerate(parts):
            got = two_ranks[rank][name][step]
            assert_close_as(got["out"], expected["out"][part], tolerance)
            if "grad_input" not in expected:
                continue  # the eval step: the running statistics normalise
            assert_close_as(got["grad_input"], expected["grad_input"][part], tolerance)
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close_as(got[key], expected[key], stats_tolerance)
        if "grad_weight" in expected:
            # Each rank holds its batch's share of the parameter gradients; DDP sums them.
            for key in ("grad_weight", "grad_bias"):
                total = sum(two_ranks[rank][name][step][key] for rank in range(2))
                assert_close_as(total, expected[key], tolerance)


def test_synced_discriminator_equals_the_plain_one_on_the_global_batch(two_ranks):
    model, logits = discriminator_step(discriminator_batch())
    logits.sum().backward()
    got = [two_ranks[rank]["discriminator"] for rank in range(2)]
    torch.testing.assert_close(torch.cat([g["logits"] for g in got]), logits.detach(), **TIGHT)
    for name, param in model.named_parameters():
        total = got[0]["grads"][name] + got[1]["grads"][name]
        torch.testing.assert_close(total, param.grad, **TIGHT, msg=f"gradient of {name}")


def test_without_process_group_it_is_plain_batchnorm():
    assert not dist.is_initialized()
    expected = run_steps(make_bn(nn.BatchNorm2d, 0.1), "unequal", slice(None))
    got = run_steps(make_bn(CpuSyncBatchNorm, 0.1), "unequal", slice(None))
    for step_got, step_expected in zip(got, expected, strict=True):
        for key, value in step_expected.items():
            torch.testing.assert_close(step_got[key], value, **TIGHT)


def test_world_size_one_is_plain_batchnorm(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        expected = run_steps(make_bn(nn.BatchNorm2d, 0.1), "equal", slice(None))
        got = run_steps(make_bn(CpuSyncBatchNorm, 0.1), "equal", slice(None))
    finally:
        dist.destroy_process_group()
    for step_got, step_expected in zip(got, expected, strict=True):
        for key, value in step_expected.items():
            torch.testing.assert_close(step_got[key], value, **TIGHT)


def small_generator() -> nn.Module:
    torch.manual_seed(3)
    model = build_generator(GeneratorSpec(nz=8, ngf=4, image_size=32, channels=1))
    model.train()
    model(torch.randn(4, 8))  # move the running statistics off their initial values
    return model


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_convert_and_revert_keep_the_state_dict(device):
    model = small_generator()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    synced = convert_sync_batchnorm(model, torch.device(device))
    sync_class = nn.SyncBatchNorm if device == "cuda" else CpuSyncBatchNorm
    assert sum(isinstance(m, sync_class) for m in synced.modules()) == plain_count == 3
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert synced.state_dict().keys() == before.keys()

    plain = revert_sync_batchnorm(synced)
    assert sum(type(m) is nn.BatchNorm2d for m in plain.modules()) == plain_count
    assert not any(isinstance(m, CpuSyncBatchNorm | nn.SyncBatchNorm) for m in plain.modules())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, before[key]), key

    # The synced weights load into a freshly built plain generator.
    fresh = build_generator(GeneratorSpec(nz=8, ngf=4, image_size=32, channels=1))
    fresh.load_state_dict(convert_sync_batchnorm(plain, torch.device(device)).state_dict())
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_converted_layers_keep_training_mode_and_hyperparameters():
    bn = nn.BatchNorm2d(5, eps=1e-3, momentum=None).eval()
    synced = convert_sync_batchnorm(nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(synced, CpuSyncBatchNorm)
    assert (synced.eps, synced.momentum, synced.training) == (1e-3, None, False)
    assert synced.weight is bn.weight and synced.running_var is bn.running_var
