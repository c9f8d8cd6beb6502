"""Differentiable augmentation (DiffAugment ops, ADA's adaptive p): gradients flow, p = 0 is
the identity and a run at p = 0 is the run without augmentation, the controller moves p the
right way, ranks agree on p, and a resumed augmented run ends bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import LocalHooks

from devtools.gloo import run_gloo_ranks
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError
from pipeline.train import augment
from pipeline.train import loop as training

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.nz=16", "model.ngf=8", "model.ndf=8", "data.image_size=16",
        "train.batch_size=4", "train.log_every_steps=2", "train.loader_workers=0",
        "train.ema_half_life_images=0"]
STEPS_PER_EPOCH = 6


def tiny_config(*overrides: str) -> Config:
    return load_config(REPO_ROOT / "params.yaml", [*TINY, *overrides])


def uniforms(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, augment.DRAWS_PER_IMAGE, generator=torch.Generator().manual_seed(seed))


# --- the ops --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", augment.ALL_OPS)
def test_each_op_is_differentiable(op):
    x = (torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    draws, p = uniforms(2).double(), torch.tensor(1.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: augment.augment(t, draws, p, (op,)), (x,))


@pytest.mark.parametrize("op", augment.ALL_OPS)
def test_each_op_changes_images_at_p_1_and_is_the_identity_at_p_0(op):
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    draws = uniforms(16)
    assert torch.equal(augment.augment(x, draws, torch.tensor(0.0), (op,)), x)
    assert not torch.equal(augment.augment(x, draws, torch.tensor(1.0), (op,)), x)


def test_translation_moves_pixels_and_fills_with_zero():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    moved = augment.translate(x, torch.tensor([1]), torch.tensor([-1]))
    # One right, one up: row 0 of the result is row 1 of the input shifted right.
    assert moved[0, 0].tolist() == [[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0]]


def test_cutout_zeros_a_square_of_half_the_side():
    x = torch.ones(1, 1, 8, 8)
    cut = augment.cutout(x, torch.tensor([4]), torch.tensor([4]))
    assert int((cut == 0).sum()) == 16 and cut[0, 0, 2:6, 2:6].abs().sum() == 0


def test_ops_default_to_what_keeps_the_meaning_of_the_image():
    assert augment.resolve_ops("auto", 1) == ("translation", "cutout")
    assert augment.resolve_ops("auto", 3) == ("translation", "cutout", "color")
    assert augment.resolve_ops("flip, translation", 3) == ("translation", "flip")


@pytest.mark.parametrize(("override", "key"), [
    ("train.augment=sometimes", "train.augment"),
    ("train.augment_ops=translation,blur", "train.augment_ops"),
    ("train.augment_p=1.5", "train.augment_p"),
    ("train.ada_target=1.0", "train.ada_target"),
    ("train.ada_speed_images=0", "train.ada_speed_images"),
])
def test_a_bad_augmentation_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        tiny_config(override)
    assert str(caught.value).startswith(f"{key}: ") and "\n" not in str(caught.value)


# --- the adaptive controller ---------------------------------------------------------------------


class StubDiscriminator(torch.nn.Module):
    """Logits of a fixed sign: a D that separates reals perfectly (+) or not at all (-)."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((images.shape[0], 1), self.logit)


@pytest.mark.parametrize(("logit", "moves"), [(5.0, "up"), (-5.0, "down")])
def test_the_controller_raises_p_when_d_tells_reals_apart_and_lowers_it_when_not(logit, moves):
    schedule = augment.AdaSchedule.from_config(0.6, 4, 1000, 64)  # 0.256 per adjustment
    p = torch.tensor(0.5)
    stub, draws = StubDiscriminator(logit), uniforms(64)
    for _ in range(3):
        signs = torch.sign(stub(augment.augment(torch.zeros(64, 1, 8, 8), draws, p,
                                                ("translation",))))
        augment.adjust_p(p, signs.sum().double(), torch.tensor(64.0), schedule)
    assert float(p) == (1.0 if moves == "up" else 0.0)  # clamped to [0, 1]


def _adaptive_p_on_ranks(rank: int, world_size: int) -> dict:
    """A few adaptive steps with this rank's own (different) data."""
    cfg = tiny_config("train.augment=adaptive", "train.ada_every_steps=2",
                      "train.ada_speed_images=64")
    env = training.LoopEnv(rank, world_size, torch.device("cpu"), STEPS_PER_EPOCH)
    loop = training.TrainLoop(cfg, env, LocalHooks())
    data = torch.Generator().manual_seed(100 + rank)
    history = []
    for _ in range(STEPS_PER_EPOCH):
        real = torch.rand(4, 1, 16, 16, generator=data) * 2 - 1
        loop._step(real, torch.randn(4, 16, generator=data))
        history.append(float(loop.augment_p))
    return {"p": torch.tensor(history)}


def test_p_is_the_same_on_two_gloo_ranks_with_different_data():
    rank0, rank1 = run_gloo_ranks(_adaptive_p_on_ranks, 2, timeout_s=120)
    assert torch.equal(rank0["p"], rank1["p"])
    assert rank0["p"].max() > 0  # it moved (the untrained D separates the ranks' data)


# --- runs ----------------------------------------------------------------------------------------


def batches(epoch: int, skip: int):
    """A fixed tiny dataset: the same batches for every run of an epoch."""
    data = torch.Generator().manual_seed(epoch)
    images = torch.randint(0, 256, (STEPS_PER_EPOCH, 4, 1, 16, 16), generator=data,
                           dtype=torch.uint8)
    for index in range(skip, STEPS_PER_EPOCH):
        yield images[index], None


def train(cfg: Config, state: dict | None = None) -> tuple[training.TrainLoop, LocalHooks]:
    hooks = LocalHooks()
    loop = training.TrainLoop(cfg, training.LoopEnv(0, 1, torch.device("cpu"), STEPS_PER_EPOCH),
                              hooks, state)
    loop.run(batches)
    return loop, hooks


def digest(loop: training.TrainLoop) -> str:
    return training.param_sha256(loop.generator, loop.discriminator)


def test_a_run_at_p_0_is_bit_identical_to_a_run_without_augmentation():
    common = ("train.epochs=2", "train.checkpoint_every_steps=100")
    off, _ = train(tiny_config("train.augment=off", *common))
    at_zero, _ = train(tiny_config("train.augment=fixed", "train.augment_p=0", *common))
    on, _ = train(tiny_config("train.augment=fixed", "train.augment_p=1", *common))
    assert digest(at_zero) == digest(off)
    assert digest(on) != digest(off)


def test_a_resumed_adaptive_run_ends_bit_identical_to_an_uninterrupted_one():
    # Checkpoints every 5 steps, p adjusted every 2: a checkpoint falls between adjustments.
    cfg = tiny_config("train.augment=adaptive", "train.ada_every_steps=2",
                      "train.ada_speed_images=32", "train.epochs=3",
                      "train.checkpoint_every_steps=5")
    straight, hooks = train(cfg)
    assert [saved["state"]["step"] for saved in hooks.saved] == [5, 10, 15, 18]
    assert 0 < float(straight.augment_p) <= 1  # p moved
    resumed, _ = train(cfg, hooks.saved[0]["state"])  # from step 5 of 18, mid-epoch
    assert resumed.resumed_from_steps == [5]
    assert digest(resumed) == digest(straight)
    assert float(resumed.augment_p) == float(straight.augment_p)
    assert [row["augment_p"] for row in resumed.log_rows] == [
        row["augment_p"] for row in straight.log_rows]
