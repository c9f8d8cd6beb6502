"""Sample-quality numbers from features: FID, KID (torchmetrics), classifier score, coverage.

FID and KID are computed by torchmetrics (a maintained implementation, no hand-written matrix
square roots) on features that `pipeline.features` extracted once: the metric is given an
identity "feature network", so cached real features can be reused across runs. torchmetrics
is imported where a distance is computed: the training loop imports this module (through the
quality probe) on GPU machines that have only torch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

KID_SUBSETS = 100  # as in the KID paper (Binkowski et al. 2018) and torch-fidelity
# A class counts as "hit" when it gets at least this share of its fair share (N / classes):
# one stray sample of a class does not make a collapsed generator diverse.
HIT_FRACTION_OF_FAIR_SHARE = 0.1
# torchmetrics gathers a metric's state from every rank at `compute()` when a process group
# exists: rank 0 measuring quality alone inside a DDP run would wait for ranks that never come.
LOCAL_ONLY = {"sync_on_compute": False}


class _Precomputed(nn.Module):
    """Identity 'feature network': the metric receives features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_pair(real: torch.Tensor, fake: torch.Tensor, minimum: int) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if min(len(real), len(fake)) < minimum:
        raise ValueError(f"need at least {minimum} samples per set, got {len(real)}/{len(fake)}")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (float64)."""
    _check_pair(real, fake, 2)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), **LOCAL_ONLY)
    metric.set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subset_size: int, seed: int = 0,
    subsets: int = KID_SUBSETS,
) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets of `subset_size`), seeded: the subsets are
    drawn from torch's global RNG, so it is forked and seeded here to leave callers' alone."""
    _check_pair(real, fake, subset_size)
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in a buffer": intended
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=subset_size,
            **LOCAL_ONLY,
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def classifier_score(logits: torch.Tensor) -> float:
    """Inception-Score-style score with the domain classifier: exp(E_x KL(p(y|x) || p(y))).
    1 for identical or uniform predictions; up to the number of classes for confident
    predictions spread evenly over all classes. Computed on all samples at once (no splits)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(logits))
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
    return float(kl.exp())


def class_coverage(
    predicted: torch.Tensor, num_classes: int, min_coverage: float
) -> dict[str, Any]:
    """How the samples spread over classes: classes hit (each with at least a tenth of its fair
    share N/num_classes), coverage = hit / num_classes, the normalised entropy of the
    predicted-class histogram (1 = uniform, 0 = one class) and `mode_collapse` when coverage
    is below `min_coverage`."""
    counts = torch.bincount(predicted.long().flatten(), minlength=num_classes)[:num_classes]
    total = int(counts.sum())
    threshold = max(1.0, HIT_FRACTION_OF_FAIR_SHARE * total / num_classes)
    hit = int((counts >= threshold).sum())
    share = counts.double() / max(total, 1)
    entropy = max(0.0, float(-(share[share > 0] * share[share > 0].log()).sum()))
    coverage = hit / num_classes
    return {
        "classes_hit": hit,
        "class_coverage": coverage,
        "class_entropy": entropy / math.log(num_classes) if num_classes > 1 else 0.0,
        "class_histogram": counts.tolist(),
        "mode_collapse": coverage < min_coverage,
    }
