"""Feature extractors for FID/KID, behind one interface (`FeatureExtractor`): images
(N, C, H, W) in [-1, 1] at the dataset's size -> features (N, D) float32; `num_features`
tells D (torchmetrics reads it). Two are available: the standard FID Inception v3
(`pipeline.models.inception`, when its weights are on disk) and the domain classifier that
the `classifier` stage trains (`pipeline.evaluate.classifier`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.config import EvalConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import ClassifierRecord
from pipeline.data.pixels import quantize
from pipeline.evaluate.classifier import load_classifier
from pipeline.models.inception import (
    INCEPTION_FILENAMES,
    find_inception_weights,
    inception_search_paths,
    load_inception,
    missing_inception_message,
)


@dataclass
class FeatureExtractor:
    """The extractor evaluate uses: its name (`classifier`/`inception`), weights hash, module,
    and, for the classifier, a function from images to logits."""

    name: str
    sha256: str
    module: nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None


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
        for batch in tqdm(images, desc=desc, unit="batch", total=total):
            batch = quantize(batch).to(device)
            features.append(module(batch).double().cpu())
            if logits is not None:
                scores.append(logits(batch).double().cpu())
    return torch.cat(features), (torch.cat(scores) if logits is not None else None)
