"""The tags a registered version carries: only what promotion and lineage need, so that its
row on the model page stays readable (`weights_sha256`; `metric.<name>` for every evaluation
score; the extractor, its hash and N; the dataset hash; the training run; the git commit and
DVC experiment). Parameters stay on the training run, which the version links to."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.core import provenance
from pipeline.core.records import DatasetStats, Evaluation, TrainRun

TAG_WEIGHTS_SHA = "weights_sha256"
TAG_EXTRACTOR = "feature_extractor"
TAG_EXTRACTOR_SHA = "feature_extractor_sha256"
TAG_NUM_SAMPLES = "num_samples"
TAG_NUM_REAL_SAMPLES = "num_real_samples"
TAG_DATASET_SHA = "dataset_sha256"
TAG_WEAK_CLASSIFIER = "weak_classifier"  # why the classifier's FID/coverage are rough
METRIC_TAG_PREFIX = "metric."
# Tags that releases before the lean registry set on every version (`param.train.lr_g`, ...).
LEGACY_TAG_PREFIXES = ("param.",)
# Tags that must be equal for two versions' metrics to be comparable, and how to name them.
COMPARABILITY_TAGS = (
    (TAG_EXTRACTOR_SHA, "feature extractor"),
    (TAG_NUM_SAMPLES, "N"),
    (TAG_NUM_REAL_SAMPLES, "number of real images"),
    (TAG_DATASET_SHA, "dataset"),
)


def evaluation_tags(evaluation: Evaluation) -> dict[str, str]:
    """Version tags of an evaluation: every score as `metric.<name>`, plus what the scores
    were measured with (extractor, its hash, N, real N)."""
    tags = {METRIC_TAG_PREFIX + key: repr(float(value)) for key, value in evaluation.scores.items()}
    tags[TAG_EXTRACTOR] = evaluation.feature_extractor
    if evaluation.feature_extractor_sha256:
        tags[TAG_EXTRACTOR_SHA] = evaluation.feature_extractor_sha256
    tags[TAG_NUM_SAMPLES] = str(evaluation.num_samples)
    tags[TAG_NUM_REAL_SAMPLES] = str(evaluation.num_real_samples)
    if evaluation.mode_collapse is not None:
        tags["mode_collapse"] = str(evaluation.mode_collapse).lower()
    if evaluation.fid_skipped_reason:
        tags["fid_skipped_reason"] = evaluation.fid_skipped_reason
    if evaluation.weak_classifier_reason:
        tags[TAG_WEAK_CLASSIFIER] = evaluation.weak_classifier_reason
    return tags


def version_tags(*, weights_sha256: str, evaluation: Evaluation, train_run: TrainRun,
                 stats: DatasetStats | None, run_tags: Mapping[str, str], root: Path
                 ) -> dict[str, str]:
    """Every tag a registered version carries (module docstring lists them). The commit is
    the training run's (else the checkout's at `root`)."""
    tags = {TAG_WEIGHTS_SHA: weights_sha256, **evaluation_tags(evaluation)}
    tags[TAG_DATASET_SHA] = stats.dataset_sha256 if stats else "unknown"
    tags["mlflow_run_id"] = train_run.mlflow_run_id
    tags["ray_run_name"] = train_run.ray_run_name
    commit = run_tags.get(provenance.TAG_GIT_COMMIT) or provenance.git_commit(root)
    if commit:
        tags["git_commit"] = commit
    experiment = run_tags.get(provenance.TAG_DVC_EXP_NAME)
    if experiment:
        tags[provenance.TAG_DVC_EXP_NAME] = experiment
    return tags
