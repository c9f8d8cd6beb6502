"""The `evaluate` stage: FID/KID against the real train split, the real-vs-real floor, class
coverage, sample grids; reports/evaluation.json (and its metrics); everything logged to the
training's MLflow run (`pipeline.evaluate.mlflow_log`: names, tags, the run's description).

Honest numbers (README, "Standard Inception FID, offline"): metric names carry the extractor
(`fid_classifier` vs `fid_inception`), and beside each distance stands its floor - the same
distance between the val and train splits with the same N - and N itself. Real features are
cached under .cache/features keyed by the shards' hash, the extractor's hash and N.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core import tracking
from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.progress import progress
from pipeline.core.records import (
    ClassifierRecord,
    DatasetStats,
    Evaluation,
    GeneratorRecord,
    TrainRun,
)
from pipeline.data import loader
from pipeline.data.grids import save_grid
from pipeline.data.pixels import quantize, to_signed
from pipeline.data.reader import shard_urls
from pipeline.evaluate import mlflow_log
from pipeline.metrics import distances, features
from pipeline.models.dcgan import Generator, GeneratorSpec, latent_noise, load_generator

log = logging.getLogger(__name__)

GRID_SIDE = 8  # samples.png and reals.png: 8 x 8
WALKS = 8  # interpolation.png: 8 latent walks ...
WALK_STEPS = 10  # ... of 10 images each


# --- inputs -------------------------------------------------------------------------------------


def _load(weights: Path, record: GeneratorRecord) -> Generator:
    try:
        return load_generator(weights, GeneratorSpec.from_dict(record.spec))
    except (KeyError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{weights}: cannot load the generator ({first})") from err


def load_trained_generator(layout: Layout) -> tuple[Generator, GeneratorRecord]:
    """The trained generator (the weight average when training kept one; eval mode,
    weights_only loading) and its record; UserError if either file is missing or the weights
    are not the ones the record names."""
    record = GeneratorRecord.load(layout)
    return _load(record.verified_weights(layout), record), record


def load_raw_generator(layout: Layout, record: GeneratorRecord) -> Generator | None:
    """The last step's weights when generator.pt is their average (else None: nothing else
    to compare), verified like the average."""
    raw = record.verified_raw_weights(layout)
    if record.ema_half_life_images == 0 or raw is None:
        return None
    return _load(raw, record)


def slerp(start: torch.Tensor, end: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation (steps, nz) from `start` to `end`: stays where a Gaussian's mass
    is (White 2016), where a straight line would pass through the unlikely low-norm centre."""
    t = torch.linspace(0, 1, steps)[:, None]
    cos = torch.dot(start / start.norm(), end / end.norm()).clamp(-1, 1)
    omega = torch.acos(cos)
    if omega.abs() < 1e-6:
        return (1 - t) * start + t * end
    return (torch.sin((1 - t) * omega) * start + torch.sin(t * omega) * end) / torch.sin(omega)


def generate(
    generator: Generator, z: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] on the CPU for noise `z`, in batches with a progress bar."""
    generator.to(device).eval()
    chunks = list(torch.split(z, batch_size))
    images = []
    with torch.no_grad():
        for chunk in progress(chunks, desc="generating", unit="batch"):
            images.append(generator(chunk.to(device)).float().cpu())
    return torch.cat(images)


# --- the stage ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleCounts:
    """How many images each measurement uses (the names of `Evaluation`'s fields)."""

    num_samples: int  # generated
    num_real_samples: int  # of the train split, the FID's reference
    floor_num_samples: int  # of each split in the real-vs-real floor
    kid_subset_size: int


def _plan(cfg: Config, stats: DatasetStats) -> SampleCounts:
    """Sample counts, checked before any work: N generated, N real, N of the floor, KID subset."""
    train_count, val_count = stats.split_samples("train"), stats.split_samples("val")
    if train_count < 2:
        raise UserError(f"the train split has {train_count} samples: FID needs at least 2")
    count = cfg.eval.num_samples
    real_count = min(count, train_count)
    floor_count = min(count, val_count, train_count)
    kid_subset = min(cfg.eval.kid_subset_size, real_count,
                     floor_count if floor_count >= 2 else real_count)
    if floor_count < count:
        log.warning("the floor uses %d samples (val split size), the FID %d", floor_count, count)
    return SampleCounts(count, real_count, floor_count, kid_subset)


def _distances(name: str, fake: torch.Tensor, train: torch.Tensor, val: torch.Tensor | None,
               plan: SampleCounts, seed: int) -> dict[str, float]:
    """fid_/kid_<extractor> of generated vs train, and their real-vs-real floors."""
    subset = plan.kid_subset_size
    out: dict[str, float] = {f"fid_{name}": distances.frechet_distance(train, fake)}
    out[f"kid_{name}"], out[f"kid_{name}_std"] = distances.kernel_distance(train, fake, subset,
                                                                           seed)
    if val is not None and plan.floor_num_samples >= 2:
        floor_train = train[: plan.floor_num_samples]
        out[f"fid_{name}_floor"] = distances.frechet_distance(floor_train, val)
        out[f"kid_{name}_floor"], _ = distances.kernel_distance(floor_train, val, subset, seed)
    return out


def _class_metrics(classifier: features.FeatureExtractor, fake: torch.Tensor, num_classes: int,
                   cfg: Config, device: torch.device) -> dict[str, Any]:
    _, logits = features.extract(
        classifier.module, torch.split(fake, cfg.eval.batch_size), device,
        desc="classifying samples", logits=classifier.logits,
    )
    assert logits is not None
    coverage = distances.class_coverage(
        logits.argmax(1), num_classes, cfg.eval.collapse_min_coverage
    )
    return {"classifier_score": distances.classifier_score(logits), **coverage}


def _grids(fake: torch.Tensor, generator: Generator, nz: int, cfg: Config, layout: Layout,
           device: torch.device) -> list[Path]:
    shown = GRID_SIDE * GRID_SIDE
    ends = torch.from_numpy(latent_noise(2 * WALKS, nz, cfg.eval.seed + 1))
    walks = torch.cat([slerp(ends[2 * i], ends[2 * i + 1], WALK_STEPS) for i in range(WALKS)])
    where = layout.shards(cfg.train.shards)
    split = "val" if _has_split("val", where) else "train"
    first_reals = next(loader.iter_split(shard_urls(split, where), batch_size=shown))[0]
    return [
        save_grid(fake[:shown], layout.samples_grid, nrow=GRID_SIDE),
        save_grid(generate(generator, walks, cfg.eval.batch_size, device),
                  layout.interpolation_grid, nrow=WALK_STEPS),
        save_grid(to_signed(first_reals), layout.reals_grid, nrow=GRID_SIDE),
    ]


def _has_split(split: str, where: str) -> bool:
    try:
        shard_urls(split, where)
    except UserError:
        return False
    return True


def _features_of(images: torch.Tensor, extractor: features.FeatureExtractor, batch_size: int,
                 device: torch.device, what: str) -> torch.Tensor:
    """The extractor's features of generated `images`, in batches."""
    found, _ = features.extract(extractor.module, torch.split(images, batch_size), device,
                                desc=f"{extractor.name} features of {what}")
    return found


@dataclass(frozen=True)
class _DistanceScores:
    """FID/KID against the real features (and their floors), or why none were measured."""

    scores: dict[str, float]
    extractor_sha256: str | None = None
    skipped_reason: str | None = None


@dataclass(frozen=True)
class _ClassScores:
    """Class coverage of the samples by the domain classifier, or why none was measured."""

    scores: dict[str, float]
    histogram: list[int] | None = None
    mode_collapse: bool | None = None
    skipped_reason: str | None = None


def _measure_distances(
    extractor_name: str | None, why: str, classifier: features.FeatureExtractor | None,
    z: torch.Tensor, fake: torch.Tensor, generator_record: GeneratorRecord, stats: DatasetStats,
    plan: SampleCounts, cfg: Config, layout: Layout, device: torch.device,
) -> _DistanceScores:
    """FID/KID of the samples `fake` of noise `z` (and of the last weights' samples of the same
    noise, when kept) with the chosen extractor; `why` is the reason when there is none."""
    if extractor_name is None:
        log.warning("%s", why)
        return _DistanceScores({}, skipped_reason=why)
    extractor = (classifier if extractor_name == "classifier" and classifier
                 else features.build_extractor(extractor_name, cfg.eval, layout))
    where = layout.shards(cfg.train.shards)
    common = (extractor, stats, where, cfg.eval.batch_size, device, layout.feature_cache_dir)
    train_features = features.real_features("train", plan.num_real_samples, *common)
    val_features = (features.real_features("val", plan.floor_num_samples, *common)
                    if plan.floor_num_samples >= 2 else None)
    fake_features = _features_of(fake, extractor, cfg.eval.batch_size, device, "samples")
    scores = _distances(extractor.name, fake_features, train_features, val_features, plan,
                        cfg.eval.seed)
    raw_generator = load_raw_generator(layout, generator_record)
    if raw_generator is not None:  # the weight average's gain over the last weights
        raw_fake = quantize(generate(raw_generator, z, cfg.eval.batch_size, device))
        raw_features = _features_of(raw_fake, extractor, cfg.eval.batch_size, device,
                                    "the last weights' samples")
        scores[f"fid_{extractor.name}_raw"] = distances.frechet_distance(train_features,
                                                                         raw_features)
    return _DistanceScores(scores, extractor_sha256=extractor.sha256)


def _measure_classes(classifier: features.FeatureExtractor | None, fake: torch.Tensor,
                     num_classes: int, cfg: Config, device: torch.device) -> _ClassScores:
    """Classifier score and class coverage of the samples; a mode collapse is logged."""
    if classifier is None:
        return _ClassScores({}, skipped_reason="no domain classifier (unlabelled data)")
    scores = _class_metrics(classifier, fake, num_classes, cfg, device)
    histogram, collapse = scores.pop("class_histogram"), scores.pop("mode_collapse")
    if collapse:
        log.warning("MODE COLLAPSE: samples hit %d of %d classes (histogram %s)",
                    scores["classes_hit"], num_classes, histogram)
    return _ClassScores(scores, histogram=histogram, mode_collapse=collapse)


def run(cfg: Config, layout: Layout) -> Evaluation:
    """Measure the trained generator; write reports/evaluation.json, its metrics and the three
    grids; log it all to the training's MLflow run. Returns the record written."""
    # Everything a user can get wrong is checked first, before any image is generated.
    stats = DatasetStats.load(layout)
    train_run = TrainRun.load(layout)
    tracking_uri = train_run.tracking_uri or tracking.resolve_tracking_uri(cfg.mlflow,
                                                                            layout.root)
    tracking.check_reachable(tracking_uri)
    generator, generator_record = load_trained_generator(layout)
    spec = GeneratorSpec.from_dict(generator_record.spec)
    if (spec.image_size, spec.channels) != (stats.image_size, stats.channels):
        raise UserError(
            f"the generator makes {spec.channels}x{spec.image_size}px images, the data are "
            f"{stats.channels}x{stats.image_size}px: re-run the train stage"
        )
    where = layout.shards(cfg.train.shards)
    shard_urls("train", where)
    extractor_name, why = features.resolve_extractor_name(cfg.eval, layout)
    plan = _plan(cfg, stats)
    has_record = ClassifierRecord.exists(layout)
    classifier_record = ClassifierRecord.load(layout) if has_record else None
    has_classifier = classifier_record is not None and not classifier_record.skipped
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    z = torch.from_numpy(latent_noise(plan.num_samples, spec.nz, cfg.eval.seed))
    fake = quantize(generate(generator, z, cfg.eval.batch_size, device))
    grids = _grids(fake, generator, spec.nz, cfg, layout, device)

    classifier = (features.build_extractor("classifier", cfg.eval, layout)
                  if has_classifier else None)
    fid = _measure_distances(extractor_name, why, classifier, z, fake, generator_record, stats,
                             plan, cfg, layout, device)
    classes = _measure_classes(classifier, fake, stats.num_classes or 0, cfg, device)
    record = Evaluation(
        feature_extractor=extractor_name or "none", **asdict(plan),
        generator_steps=generator_record.steps, scores={**fid.scores, **classes.scores},
        feature_extractor_sha256=fid.extractor_sha256, fid_skipped_reason=fid.skipped_reason,
        class_histogram=classes.histogram, mode_collapse=classes.mode_collapse,
        class_metrics_skipped_reason=classes.skipped_reason,
        weak_classifier_reason=classifier_record.weak_reason
        if classifier is not None and classifier_record is not None else None,
    )
    record_path = record.save(layout)
    samples, interpolation, reals = grids
    mlflow_log.log_evaluation(
        tracking_uri, train_run.mlflow_run_id, record, step=generator_record.images_seen,
        quality=train_run.quality.words() if train_run.quality else None,
        root_images=[samples, interpolation],
        files=[reals, record_path, layout.metrics(Evaluation.STAGE)],
    )
    return record
