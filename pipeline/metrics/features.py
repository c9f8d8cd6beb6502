"""Feature extractors for FID/KID, behind one interface (`FeatureExtractor`): images
(N, C, H, W) in [-1, 1] at the dataset's size -> features (N, D) float32; `num_features`
tells D (torchmetrics reads it). Two are available: the standard FID Inception v3
(`pipeline.models.inception`, when its weights are on disk) and the domain classifier that
the `classifier` stage trains. Real features are cached on disk, keyed by the shards, the
extractor and N, so training's quality probe and the evaluate stage measure them once."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.config import EvalConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.progress import progress
from pipeline.core.records import ClassifierRecord, DatasetStats
from pipeline.data import loader
from pipeline.data.pixels import quantize, to_signed
from pipeline.data.reader import shard_urls
from pipeline.models.classifier import ClassifierSpec, DomainClassifier
from pipeline.models.inception import (
    INCEPTION_FILENAMES,
    find_inception_weights,
    inception_search_paths,
    load_inception,
    missing_inception_message,
)

log = logging.getLogger(__name__)


@dataclass
class FeatureExtractor:
    """The extractor evaluate uses: its name (`classifier`/`inception`), weights hash, module,
    and, for the classifier, a function from images to logits."""

    name: str
    sha256: str
    module: nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None


def load_classifier(layout: Layout) -> tuple[DomainClassifier, str]:
    """The trained classifier (eval mode) and its weights' SHA-256, verified against its
    record; UserError when the stage has not run or skipped it."""
    record = ClassifierRecord.load(layout)
    weights = record.verified_weights(layout)
    assert record.arch is not None and record.sha256 is not None
    model = DomainClassifier(ClassifierSpec.from_dict(record.arch))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), record.sha256


def resolve_extractor_name(eval_cfg: EvalConfig, layout: Layout) -> tuple[str | None, str]:
    """Which extractor to use, decided cheaply before any work: ('inception' | 'classifier' |
    None, why). None means no FID can be computed (the reason says why); a choice that cannot
    work raises UserError naming the file to provide."""
    choice = eval_cfg.feature_extractor
    weights = find_inception_weights(eval_cfg, layout.root)
    if choice == "inception" or (choice == "auto" and weights is not None):
        if weights is None:
            raise UserError(missing_inception_message(eval_cfg, layout.root))
        return "inception", f"Inception weights at {weights}"
    if choice == "auto" and eval_cfg.inception_weights:
        # asked for a file that is not there
        raise UserError(missing_inception_message(eval_cfg, layout.root))
    record = ClassifierRecord.load(layout)
    if record.skipped:
        places = " or ".join(str(p) for p in inception_search_paths(eval_cfg, layout.root))
        why = (
            f"no FID: no Inception weights (put {INCEPTION_FILENAMES[0]} at {places}) and no "
            f"domain classifier ({record.reason})"
        )
        if choice == "classifier":
            raise UserError(f"eval.feature_extractor=classifier, but {why}")
        return None, why
    return "classifier", "the domain classifier of the classifier stage"


def build_extractor(name: str, eval_cfg: EvalConfig, layout: Layout) -> FeatureExtractor:
    """Load the extractor `resolve_extractor_name` chose."""
    if name == "inception":
        weights = find_inception_weights(eval_cfg, layout.root)
        if weights is None:
            raise UserError(missing_inception_message(eval_cfg, layout.root))
        model, digest = load_inception(weights)
        return FeatureExtractor("inception", digest, model)
    model, digest = load_classifier(layout)
    return FeatureExtractor("classifier", digest, model, logits=model.logits)


def extract(
    module: nn.Module, images: Iterable[torch.Tensor], device: torch.device, desc: str,
    total: int | None = None, logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (N, D) float64 (and logits, when given a logits function) of image batches."""
    features, scores = [], []
    module.to(device).eval()
    with torch.no_grad():
        for batch in progress(images, desc=desc, unit="batch", total=total):
            batch = quantize(batch).to(device)
            features.append(module(batch).double().cpu())
            if logits is not None:
                scores.append(logits(batch).double().cpu())
    return torch.cat(features), (torch.cat(scores) if logits is not None else None)


def real_features(
    split: str, count: int, extractor: FeatureExtractor, stats: DatasetStats,
    shards: str, batch_size: int, device: torch.device, cache_dir: Path,
) -> torch.Tensor:
    """Features of the first `count` samples of `split`, from the cache when the same shards,
    extractor and N were measured before (plain .npy arrays: nothing is unpickled)."""
    key = f"{split}-{extractor.name}-{stats.split_hash(split)[:16]}-{extractor.sha256[:16]}"
    path = cache_dir / f"{key}-n{count}.npy"
    if path.exists():
        log.info("real %s features from cache %s", split, path)
        return torch.from_numpy(np.load(path, allow_pickle=False))
    batches = loader.iter_split(shard_urls(split, shards), batch_size=batch_size, limit=count)
    found, _ = extract(
        extractor.module, (to_signed(pixels) for pixels, _ in batches), device,
        desc=f"{extractor.name} features of real {split}", total=math.ceil(count / batch_size),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Atomic, and a name of this process's own: a killed run never leaves a half-written
    # entry, and two runs that fill the same entry at once do not trip over each other.
    partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, found.numpy(), allow_pickle=False)
    partial.replace(path)
    return found
