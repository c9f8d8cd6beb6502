"""Model quality: the generator's weight average, quality measured while training, where it was
best, and the classifier gate that fits the data (built-in digits vs a user's folder)."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict

import pytest
import torch
from test_training import LocalHooks, tiny_config
from torch import nn

from devtools.gloo import run_gloo_ranks
from pipeline.core.config import ClassifierConfig
from pipeline.core.errors import UserError
from pipeline.core.records import Evaluation, QualitySummary
from pipeline.evaluate import mlflow_log
from pipeline.evaluate.classifier import below_min_policy, gate
from pipeline.metrics.probe import QualityProbe, QualityReference
from pipeline.models.classifier import ClassifierSpec, DomainClassifier
from pipeline.models.dcgan import GeneratorSpec, build_generator
from pipeline.train import loop as training
from pipeline.train.ema import EMA_RAMPUP, GeneratorEma

# --- the weight average -------------------------------------------------------------------------


def test_the_average_half_life_ramps_up_with_images_seen_then_holds():
    ema = GeneratorEma(nn.Linear(2, 2), half_life_images=10_000, global_batch=100)
    early = 20_000  # a ramped half-life of 5 % x 20,000 = 1,000 images = 10 steps
    assert ema.decay(early) == pytest.approx(0.5 ** (100 / (EMA_RAMPUP * early)))
    assert ema.decay(1_000_000) == pytest.approx(0.5 ** (100 / 10_000))  # the configured one
    # After `half-life` images of updates towards a fixed target, half the gap is left.
    steps = 10_000 // 100
    assert ema.decay(1_000_000) ** steps == pytest.approx(0.5)


def test_an_update_moves_the_average_by_one_minus_the_decay():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    ema = GeneratorEma(model, half_life_images=1_000, global_batch=10)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update(model, images_seen=1_000_000)
    keep = ema.decay(1_000_000)
    for old, new, current in zip(before, ema.model.parameters(), model.parameters(),
                                 strict=True):
        assert torch.allclose(new, keep * old + (1 - keep) * current)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_refreshed_statistics_are_the_noise_batch_statistics_and_the_average_stays_in_eval():
    torch.manual_seed(0)
    generator = build_generator(GeneratorSpec(16, 8, 16, 1))
    ema = GeneratorEma(generator, half_life_images=1_000, global_batch=8)
    noise = torch.randn(64, 16)
    images = ema.refresh_batchnorm(noise)
    first_norm = next(m for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        model = ema.model
        activations = model.project(noise).unflatten(1, (model.start_depth, 4, 4))
    assert torch.allclose(first_norm.running_mean, activations.mean((0, 2, 3)), atol=1e-5)
    assert first_norm.momentum == 0.1 and not ema.model.training
    # With the refreshed statistics, eval mode draws what the refresh returned.
    with torch.no_grad():
        again = ema.model(noise).clamp(-1, 1)
    assert (again - images).abs().max() < 1e-2
    assert images.shape == (64, 1, 16, 16) and images.abs().max() <= 1


# --- quality while training ---------------------------------------------------------------------


def _reference(count: int = 64, image_size: int = 16) -> tuple[QualityReference, torch.Tensor]:
    """A reference from a (random, fixed) classifier and `count` real-looking images."""
    torch.manual_seed(0)
    # One conv per block: an untrained deeper one squeezes every input to nearly one feature.
    spec = ClassifierSpec(image_size, 1, 10, convs_per_block=1)
    classifier = DomainClassifier(spec).eval()
    reals = (torch.rand(count, 1, image_size, image_size) > 0.7).float() * 2 - 1
    with torch.no_grad():
        features = classifier(reals).double()
    return QualityReference(asdict(spec), classifier.state_dict(), "0" * 64, features, 10), reals


def test_the_probe_puts_the_real_images_at_zero_and_blank_ones_far_away():
    reference, reals = _reference()
    probe = QualityProbe(reference, torch.device("cpu"))
    same = probe.measure(reals)
    blank = probe.measure(torch.full_like(reals, -1.0))
    assert same["fid_classifier"] == pytest.approx(0.0, abs=1e-3)
    assert blank["fid_classifier"] > 1.0
    assert blank["classes_hit"] == 1 and blank["class_coverage"] == pytest.approx(0.1)
    assert probe.num_samples == 64


def _loop(probe: QualityProbe | None, hooks: LocalHooks, state: dict | None = None,
          **overrides: object) -> training.TrainLoop:
    cfg = tiny_config(**{"data.image_size": 16, "train.batch_size": 4, "train.epochs": 3,
                         "train.checkpoint_every_steps": 4, "train.log_every_steps": 2,
                         "train.ema_half_life_images": 40, "train.eval_every_images": 0,
                         **overrides})
    env = training.LoopEnv(0, 1, torch.device("cpu"), steps_per_epoch=5)
    return training.TrainLoop(cfg, env, hooks, state, probe)


def _batches(epoch: int, skip: int):
    generator = torch.Generator().manual_seed(epoch)
    images = torch.randint(0, 256, (5, 4, 1, 16, 16), dtype=torch.uint8, generator=generator)
    for index in range(skip, 5):
        yield images[index], None


def test_quality_is_measured_at_every_epoch_end_logged_and_kept_in_checkpoints():
    reference, _ = _reference()
    hooks = LocalHooks()
    loop = _loop(QualityProbe(reference, torch.device("cpu")), hooks)
    result = loop.run(_batches)
    assert [row["step"] for row in hooks.quality] == [5, 10, 15]
    assert [row["images_seen"] for row in hooks.quality] == [20, 40, 60]
    assert [row["epoch"] for row in hooks.quality] == [1, 2, 3]
    assert all(row["fid_classifier"] > 0 and 1 <= row["classes_hit"] <= 10
               for row in hooks.quality)
    final = hooks.saved[-1]["state"]
    assert final["quality_rows"] == hooks.quality
    assert final["generator_ema"] is not None and result.quality_s > 0


def test_quality_every_n_images_and_at_the_last_step():
    reference, _ = _reference()
    hooks = LocalHooks()
    _loop(QualityProbe(reference, torch.device("cpu")), hooks,
          **{"train.eval_every_images": 24}).run(_batches)
    # 24 images = 6 steps of 4: after steps 6 and 12, and always at the end (15).
    assert [row["step"] for row in hooks.quality] == [6, 12, 15]


def test_a_resumed_run_keeps_its_quality_rows_and_ends_with_the_same_average():
    reference, _ = _reference()
    straight_hooks = LocalHooks()
    _loop(QualityProbe(reference, torch.device("cpu")), straight_hooks).run(_batches)

    first_hooks = LocalHooks()
    _loop(QualityProbe(reference, torch.device("cpu")), first_hooks,
          **{"train.epochs": 2}).run(_batches)
    checkpoint = copy.deepcopy(first_hooks.saved[-1]["state"])  # step 10, two rows
    resumed_hooks = LocalHooks()
    _loop(QualityProbe(reference, torch.device("cpu")), resumed_hooks, checkpoint).run(_batches)

    straight, resumed = straight_hooks.saved[-1]["state"], resumed_hooks.saved[-1]["state"]
    assert [row["step"] for row in resumed["quality_rows"]] == [5, 10, 15]
    assert resumed["quality_rows"] == straight["quality_rows"]
    for key, value in straight["generator_ema"].items():
        assert torch.equal(value, resumed["generator_ema"][key]), key


def test_without_a_classifier_nothing_is_measured_and_without_an_average_none_is_saved():
    hooks = LocalHooks()
    _loop(None, hooks, **{"train.ema_half_life_images": 0}).run(_batches)
    final = hooks.saved[-1]["state"]
    assert hooks.quality == [] and final["quality_rows"] == []
    assert final["generator_ema"] is None


def _two_rank_run(rank: int, world_size: int) -> dict:
    """Two DDP ranks for one epoch; rank 0 alone measures quality (as under Ray)."""
    reference, _ = _reference()
    probe = QualityProbe(reference, torch.device("cpu")) if rank == 0 else None
    hooks = LocalHooks()
    cfg = tiny_config(**{"data.image_size": 16, "train.batch_size": 2, "train.epochs": 1,
                         "train.checkpoint_every_steps": 5, "train.ema_half_life_images": 40,
                         "train.eval_every_images": 0})
    env = training.LoopEnv(rank, world_size, torch.device("cpu"), steps_per_epoch=5)
    training.TrainLoop(cfg, env, hooks, None, probe).run(
        lambda epoch, skip: ((images[rank::2], None) for images, _ in _batches(epoch, skip)))
    return {"quality_rows": len(hooks.quality)}


def test_rank_0_measures_quality_alone_while_the_other_ranks_wait():
    """The metrics must not gather across ranks (torchmetrics does by default when a process
    group exists): rank 1 never measures, and a gather would hang the run."""
    results = run_gloo_ranks(_two_rank_run, 2, timeout_s=60)
    assert [r["quality_rows"] for r in results] == [1, 0]


def test_a_run_that_got_worse_at_the_end_says_so():
    rows = [{"step": s, "images_seen": 10 * s, "fid_classifier": f}
            for s, f in ((1, 90.0), (2, 30.0), (3, 40.0))]
    summary = QualitySummary.of_rows(rows)
    assert summary is not None
    assert (summary.best_step, summary.best_fid_classifier) == (2, 30.0)
    assert summary.worse_at_end and "WORSE AT THE END (40.00)" in summary.words()
    steady = QualitySummary.of_rows(
        [*rows[:2], {"step": 3, "images_seen": 30, "fid_classifier": 31.0}])
    assert steady is not None and not steady.worse_at_end
    assert steady.words() == "best in-training FID 30.00 at 20 images"
    assert QualitySummary.of_rows([]) is None


# --- the classifier gate ------------------------------------------------------------------------


def test_the_built_in_digits_keep_the_strict_bar_and_a_users_folder_goes_on_marked_weak(caplog):
    ccfg = ClassifierConfig(min_val_accuracy=0.98)
    assert below_min_policy(ccfg, "mnist5k") == "error"
    assert below_min_policy(ccfg, "/data/photos") == "weak"
    assert gate(0.99, 500, ccfg, "mnist5k") is None
    with pytest.raises(UserError, match=r"0\.9000 val accuracy on 500 samples, below "
                                        r"classifier\.min_val_accuracy=0\.98.*on_below_min=weak"):
        gate(0.90, 500, ccfg, "mnist5k")
    with caplog.at_level(logging.WARNING):
        reason = gate(0.7273, 22, ccfg, "/data/photos")
    assert reason == "val accuracy 0.7273 < classifier.min_val_accuracy 0.98"
    assert "marked weak" in caplog.text
    strict = ClassifierConfig(min_val_accuracy=0.98, on_below_min="error")
    with pytest.raises(UserError):
        gate(0.7273, 22, strict, "/data/photos")
    lenient = ClassifierConfig(min_val_accuracy=0.98, on_below_min="weak")
    assert gate(0.90, 500, lenient, "mnist5k") is not None


def test_the_runs_description_names_a_weak_classifier_the_average_gain_and_the_best_point():
    record = Evaluation(
        feature_extractor="classifier", num_samples=500, num_real_samples=500,
        floor_num_samples=500, kid_subset_size=100, generator_steps=1400,
        scores={"fid_classifier": 28.5, "fid_classifier_floor": 4.4,
                "fid_classifier_raw": 35.0, "classes_hit": 3},
        mode_collapse=False, class_histogram=[10, 10, 10],
        weak_classifier_reason="val accuracy 0.7273 < classifier.min_val_accuracy 0.98",
    )
    text = mlflow_log.description(record, {}, {}, "best in-training FID 27.00 at 80,000 images")
    assert ("FID 28.50 vs floor 4.40, last weights 35.00 (classifier, WEAK: val accuracy "
            "0.7273 < classifier.min_val_accuracy 0.98, N=500)") in text
    assert text.endswith("best in-training FID 27.00 at 80,000 images")
    assert mlflow_log.tags(record)["eval.weak_classifier"].startswith("val accuracy 0.7273")
