"""The R1 penalty on reals (`train.r1_gamma`, lazy every `train.r1_every_steps`): it lowers
D's gradient at reals, runs only every N steps, is the same on 2 DDP ranks with synchronized
BatchNorm (whose fused backward is differentiable once) as on one with the global batch, and
a resumed run ends bit-identical."""

from __future__ import annotations

import pytest
import torch
from test_augment import STEPS_PER_EPOCH, digest, tiny_config, train
from test_training import LocalHooks

from devtools.gloo import run_gloo_ranks
from pipeline.core.errors import ConfigError
from pipeline.train import loop as training
from pipeline.train import sync_bn


def _gradient_norm_at(discriminator: torch.nn.Module, real: torch.Tensor) -> float:
    seen = real.clone().requires_grad_(True)
    with sync_bn.differentiable_twice(discriminator):
        (grad,) = torch.autograd.grad(discriminator(seen).sum(), seen)
    return float(grad.square().flatten(1).sum(1).mean())


def test_inside_the_penalty_batchnorm_trains_as_usual_twice_differentiably_and_keeps_its_stats():
    norm = torch.nn.BatchNorm2d(3).train()
    x = (torch.randn(8, 3, 5, 5) * 2 + 1).requires_grad_(True)
    with sync_bn.differentiable_twice(norm):
        inside = norm(x)
        (grad,) = torch.autograd.grad(inside.square().sum(), x, create_graph=True)
        grad.square().sum().backward()  # the gradient of a function of the input gradient
    assert torch.equal(norm.running_mean, torch.zeros(3)) and int(norm.num_batches_tracked) == 0
    assert torch.allclose(inside, norm(x), atol=1e-6)  # training mode's values
    assert norm.weight.grad is not None and "forward" not in vars(norm)  # restored


def test_r1_steps_lower_the_gradient_of_d_at_reals():
    cfg = tiny_config("train.r1_gamma=10", "train.r1_every_steps=1")
    loop = training.TrainLoop(cfg, training.LoopEnv(0, 1, torch.device("cpu"), STEPS_PER_EPOCH),
                              LocalHooks())
    real = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    draws = loop._draw()
    before = _gradient_norm_at(loop.discriminator, real)
    for _ in range(5):
        loop._r1_step(real, draws)
    assert _gradient_norm_at(loop.discriminator, real) < 0.5 * before


def test_r1_runs_every_n_steps_only():
    common = ("train.epochs=1", "train.checkpoint_every_steps=100")
    off, _ = train(tiny_config(*common, "train.r1_gamma=0"))
    lazy, _ = train(tiny_config(*common, "train.r1_gamma=1", "train.r1_every_steps=7"))
    assert digest(lazy) == digest(off)  # 6 steps: never at a multiple of 7
    every_3, _ = train(tiny_config(*common, "train.r1_gamma=1", "train.r1_every_steps=3"))
    assert digest(every_3) != digest(off)


def test_a_resumed_run_with_r1_ends_bit_identical_to_an_uninterrupted_one():
    cfg = tiny_config("train.r1_gamma=1", "train.r1_every_steps=2", "train.epochs=3",
                      "train.checkpoint_every_steps=5")
    straight, hooks = train(cfg)
    resumed, _ = train(cfg, hooks.saved[0]["state"])  # from step 5 of 18: an R1 step is next
    assert resumed.resumed_from_steps == [5]
    assert digest(resumed) == digest(straight)


def _r1_gradients(rank: int, world_size: int, real: torch.Tensor) -> dict:
    """One R1 update of D on this rank's share of `real`: D's gradients and weights after."""
    cfg = tiny_config("train.r1_gamma=1", f"train.batch_size={len(real) // world_size}")
    env = training.LoopEnv(rank, world_size, torch.device("cpu"), STEPS_PER_EPOCH)
    loop = training.TrainLoop(cfg, env, LocalHooks())
    share = real.chunk(world_size)[rank]
    loop._r1_step(share, loop._draw())
    discriminator = training.unwrap(loop.discriminator)
    return {"grads": [param.grad.clone() for param in discriminator.parameters()],
            "digest": digest(loop)}


def test_r1_on_two_gloo_ranks_with_synchronized_batchnorm_is_r1_on_the_global_batch():
    real = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    rank0, rank1 = run_gloo_ranks(_r1_gradients, 2, (real,), timeout_s=120)
    alone = _r1_gradients(0, 1, real)
    assert rank0["digest"] == rank1["digest"]  # DDP reduced the penalty's gradients
    for two_ranks, one_rank in zip(rank0["grads"], alone["grads"], strict=True):
        assert torch.allclose(two_ranks, one_rank, rtol=1e-3, atol=1e-5)
    assert any(grad.abs().max() > 0 for grad in alone["grads"])


@pytest.mark.parametrize(("override", "key"), [("train.r1_gamma=-1", "train.r1_gamma"),
                                               ("train.r1_every_steps=0", "train.r1_every_steps")])
def test_a_bad_r1_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        tiny_config(override)
    assert key in str(caught.value) and "\n" not in str(caught.value)



def test_r1_under_bf16_autocast_trains_with_finite_losses_and_changes_the_run():
    common = ("train.precision=bf16", "train.epochs=1", "train.r1_every_steps=2")
    without, _ = train(tiny_config(*common, "train.r1_gamma=0"))
    with_r1, _ = train(tiny_config(*common, "train.r1_gamma=1"))
    assert digest(with_r1) != digest(without)
    assert all(torch.isfinite(torch.tensor([row["loss_d"], row["loss_g"]])).all()
               for row in with_r1.log_rows)
