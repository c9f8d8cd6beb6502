"""The `classifier` stage: train the domain classifier (`pipeline.models.classifier`) on the
labelled train shards, check it on val, save it with its record; and load it back, verified.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

from pipeline.core.config import BUILTIN_SOURCE, ClassifierConfig, Config
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.core.layout import Layout
from pipeline.core.progress import progress
from pipeline.core.records import ClassifierRecord, DatasetStats
from pipeline.data import cache, loader
from pipeline.data.pixels import to_signed
from pipeline.data.reader import shard_urls
from pipeline.models.classifier import ClassifierSpec, DomainClassifier

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]

# Augmentation: a random affine warp per image - shifts, rotations, scaling and shear of a
# hand's size. On mnist5k it is worth 0.2-0.4 % val accuracy over shifts alone.
SHIFT_PX = 2
ROTATION_DEG = 12.0
SCALE = 0.1  # sizes in [1 - SCALE, 1 + SCALE]
SHEAR = 0.2
LABEL_SMOOTHING = 0.1  # one conv per block, mnist5k: 98.4 % val accuracy with it, 98.2 % without
VAL_BATCH_SIZE = 256


def random_affine(images: torch.Tensor, generator: torch.Generator, *, shift_px: float = SHIFT_PX,
                  rotation_deg: float = ROTATION_DEG, scale: float = SCALE,
                  shear: float = SHEAR) -> torch.Tensor:
    """Warp each image by its own random affine map: a shift of up to `shift_px` pixels, a
    rotation of up to `rotation_deg`, a size change of up to `scale` and a shear of up to
    `shear`, filling with the edge pixels (the background of most datasets)."""
    count, _, height, width = images.shape

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 2 - 1) * bound

    angle, size = uniform(math.radians(rotation_deg)), 1 + uniform(scale)
    slant = uniform(shear)
    # affine_grid works in [-1, 1] coordinates: a pixel is 2 / side wide.
    dx, dy = uniform(shift_px) * 2 / width, uniform(shift_px) * 2 / height
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos / size, (slant - sin) / size, dx], 1),
        torch.stack([sin / size, cos / size, dy], 1),
    ], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="border")


def accuracy(model: DomainClassifier, batches: Batches) -> tuple[float, int]:
    """(share of correctly classified samples, number of samples) over labelled batches."""
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for pixels, labels in batches:
            images = to_signed(pixels)
            correct += int((model.logits(images).argmax(1) == labels).sum())
            seen += len(images)
    return (correct / seen if seen else float("nan")), seen


def fit_classifier(
    spec: ClassifierSpec,
    epoch_batches: Callable[[int], Batches],
    steps_per_epoch: int,
    ccfg: ClassifierConfig,
) -> DomainClassifier:
    """Train a classifier: Adam with a one-cycle schedule peaking at `ccfg.lr` (few epochs
    reach a good optimum), random affine warps and label smoothing against overfitting small
    data. `epoch_batches(epoch)` yields the (images, labels) batches of one epoch."""
    torch.manual_seed(ccfg.seed)
    warps = torch.Generator().manual_seed(ccfg.seed)
    # Channels-last convolutions train about 20 % faster on CPU (oneDNN); the saved weights
    # go back to the standard layout.
    model = DomainClassifier(spec).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=ccfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=ccfg.lr, total_steps=ccfg.epochs * steps_per_epoch
    )
    for epoch in range(ccfg.epochs):
        model.train()
        bar = progress(epoch_batches(epoch), total=steps_per_epoch, unit="batch",
                       desc=f"classifier epoch {epoch + 1}/{ccfg.epochs}")
        for pixels, labels in bar:
            logits = model.logits(random_affine(to_signed(pixels), warps))
            loss = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.to(memory_format=torch.contiguous_format).eval()


def save_classifier(model: DomainClassifier, layout: Layout, **extra) -> ClassifierRecord:
    """Write weights.pt (a plain state_dict) and its record (architecture, hash, `extra`)."""
    layout.classifier_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), layout.classifier_weights)
    record = ClassifierRecord(
        skipped=False, arch=asdict(model.spec), num_classes=model.spec.num_classes,
        feature_dim=model.spec.feature_dim, sha256=sha256_file(layout.classifier_weights),
        **extra,
    )
    record.save(layout)
    return record


def below_min_policy(ccfg: ClassifierConfig, source: str) -> str:
    """`error` or `weak`: what a classifier below `min_val_accuracy` means. `auto` holds the
    built-in dataset to its bar (a digit classifier that misses it is a bug) and lets a user's
    own folder go on: a few hundred photos cannot train a strong classifier, and a rough FID
    and class coverage, marked weak, beat none."""
    if ccfg.on_below_min != "auto":
        return ccfg.on_below_min
    return "error" if source == BUILTIN_SOURCE else "weak"


def gate(val_accuracy: float, val_samples: int, ccfg: ClassifierConfig, source: str
         ) -> str | None:
    """None when the classifier clears `classifier.min_val_accuracy`; else why it is weak
    (policy `weak`) or a UserError (policy `error`)."""
    if val_accuracy >= ccfg.min_val_accuracy:
        return None
    shortfall = (f"domain classifier reached {val_accuracy:.4f} val accuracy on {val_samples} "
                 f"samples, below classifier.min_val_accuracy={ccfg.min_val_accuracy}")
    if below_min_policy(ccfg, source) == "error":
        raise UserError(f"{shortfall}: raise classifier.epochs, or set "
                        "classifier.on_below_min=weak to go on with FIDs marked weak")
    log.warning("%s: FID and class coverage measured with it are marked weak", shortfall)
    return f"val accuracy {val_accuracy:.4f} < classifier.min_val_accuracy {ccfg.min_val_accuracy}"


def skip_reason(stats: DatasetStats) -> str | None:
    """Why no classifier can be trained on this dataset, or None."""
    if not stats.labelled:
        return "the data source has no labels"
    if (stats.num_classes or 0) < 2:
        return f"the data source has {stats.num_classes or 0} class(es); a classifier needs 2+"
    return None


def run(cfg: Config, layout: Layout) -> ClassifierRecord:
    """The `classifier` stage: train on the labelled train shards, check on val (at least
    `classifier.min_val_accuracy`), save under models/classifier. Unlabelled data: only the
    record, saying why nothing was trained."""
    stats = DatasetStats.load(layout)
    layout.classifier_weights.unlink(missing_ok=True)  # never a stale model beside a new record
    reason = skip_reason(stats)
    if reason:
        record = ClassifierRecord(skipped=True, reason=reason)
        record.save(layout)
        log.info("classifier skipped: %s", reason)
        return record

    ccfg = cfg.classifier
    where = layout.shards(cfg.train.shards)
    train_urls, val_urls = shard_urls("train", where), shard_urls("val", where)
    train_samples = stats.split_samples("train")
    steps = loader.steps_per_epoch(train_samples, ccfg.batch_size, 1)
    spec = ClassifierSpec(stats.image_size, stats.channels, stats.num_classes or 0)
    started = time.monotonic()
    # Decoded once and kept in memory (when it fits): the epochs only draw from it.
    epoch_batches = cache.training_batches(
        train_urls, cache="auto", with_labels=True, split_shape=stats.split_shape("train"),
        batch_size=ccfg.batch_size, rank=0, world_size=1, num_batches=steps, seed=ccfg.seed,
        device=torch.device("cpu"), decode_processes=1, loader_workers=0,
    )
    model = fit_classifier(spec, epoch_batches, steps, ccfg)
    val_accuracy, val_samples = accuracy(
        model, loader.iter_split(val_urls, batch_size=VAL_BATCH_SIZE, with_labels=True)
    )
    seconds = time.monotonic() - started
    weak_reason = gate(val_accuracy, val_samples, ccfg, cfg.data.source)
    record = save_classifier(
        model, layout, val_accuracy=round(val_accuracy, 6), val_samples=val_samples,
        train_samples=train_samples, epochs=ccfg.epochs, train_seconds=round(seconds, 1),
        dataset_sha256=stats.dataset_sha256, class_names=stats.class_names,
        weak_reason=weak_reason,
    )
    log.info("classifier: %.4f val accuracy on %d samples (%.0f s)", val_accuracy, val_samples,
             seconds)
    return record
