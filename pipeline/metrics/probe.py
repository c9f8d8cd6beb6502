"""Quality while training: the classifier FID and class coverage of a fixed batch of samples,
measured on rank 0 against real features that the driver computed once (StyleGAN2-ADA's
metrics during training, on the domain classifier).

The driver builds a `QualityReference` (the classifier's weights, the real features, N) and
ships it in the worker plan; rank 0 turns it into a `QualityProbe`. The probe uses the same
extractor, real features and N as the evaluate stage, so the last in-training FID and the
final one differ only by the noise of the samples drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.config import Config
from pipeline.core.layout import Layout
from pipeline.core.records import ClassifierRecord, DatasetStats
from pipeline.data.pixels import quantize
from pipeline.metrics import distances, features
from pipeline.models.classifier import ClassifierSpec, DomainClassifier

log = logging.getLogger(__name__)

QUALITY_COLUMNS = ("step", "epoch", "images_seen", "fid_classifier", "class_coverage",
                   "classes_hit")
REAL_BATCH_SIZE = 250  # batch of the one-off real feature extraction (no effect on results)


@dataclass(frozen=True)
class QualityReference:
    """What rank 0 needs to measure quality: the classifier (spec + weights), the real
    features it is compared with, and N (the evaluate stage's N)."""

    classifier_spec: dict[str, int]
    classifier_state: dict[str, torch.Tensor]
    classifier_sha256: str
    real_features: torch.Tensor  # (N, D) float64, of the first N train samples
    num_classes: int

    @property
    def num_samples(self) -> int:
        """N: the samples measured each time (= the real features' count)."""
        return len(self.real_features)


def quality_reference(cfg: Config, layout: Layout) -> tuple[QualityReference | None, str]:
    """The reference for `cfg`'s run, or None and why not (no classifier: unlabelled data).
    Real features come from (and go to) the cache the evaluate stage reads."""
    if not ClassifierRecord.exists(layout):
        return None, "no quality during training: the classifier stage has not run"
    record = ClassifierRecord.load(layout)
    if record.skipped:
        return None, f"no quality during training: no domain classifier ({record.reason})"
    stats = DatasetStats.load(layout)
    extractor = features.build_extractor("classifier", cfg.eval, layout)
    count = min(cfg.eval.num_samples, stats.split_samples("train"))
    real = features.real_features(
        "train", count, extractor, stats, layout.shards(cfg.train.shards), REAL_BATCH_SIZE,
        torch.device("cpu"), layout.feature_cache_dir,
    )
    assert record.arch is not None
    reference = QualityReference(record.arch, extractor.module.state_dict(), extractor.sha256,
                                 real, stats.num_classes or 0)
    return reference, f"classifier FID and class coverage of {count} samples"


class QualityProbe:
    """Measures a generator's samples against a `QualityReference` (rank 0 only)."""

    def __init__(self, reference: QualityReference, device: torch.device) -> None:
        self.reference = reference
        self.device = device
        self.classifier = DomainClassifier(ClassifierSpec.from_dict(reference.classifier_spec))
        self.classifier.load_state_dict(reference.classifier_state)
        self.classifier.to(device).eval()

    @property
    def num_samples(self) -> int:
        """N, the samples each measurement needs."""
        return self.reference.num_samples

    def measure(self, images: torch.Tensor) -> dict[str, Any]:
        """fid_classifier, class_coverage and classes_hit of `images` (N, C, H, W) in [-1, 1],
        quantized to 8 bits as saved images are."""
        with torch.no_grad():
            batch = quantize(images.float()).to(self.device)
            embedded = self.classifier(batch)
            logits = self.classifier.head(embedded)
        fid = distances.frechet_distance(self.reference.real_features, embedded.double().cpu())
        coverage = distances.class_coverage(logits.argmax(1).cpu(), self.reference.num_classes,
                                            min_coverage=0.0)
        return {"fid_classifier": fid, "class_coverage": coverage["class_coverage"],
                "classes_hit": coverage["classes_hit"]}
