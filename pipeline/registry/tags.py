"""The tags a registered version carries: what `promote` compares and what the MLflow UI
shows (`weights_sha256`; `metric.<name>` for every evaluation score; the extractor, its hash and
N; the dataset hash; `param.<section.key>`; the training run; the git commit)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.core.config import Config, to_flat_dict
from pipeline.core.records import DatasetStats, Evaluation, TrainRun

TAG_WEIGHTS_SHA = "weights_sha256"
TAG_EXTRACTOR = "feature_extractor"
TAG_EXTRACTOR_SHA = "feature_extractor_sha256"
TAG_NUM_SAMPLES = "num_samples"
TAG_NUM_REAL_SAMPLES = "num_real_samples"
TAG_DATASET_SHA = "dataset_sha256"
METRIC_TAG_PREFIX = "metric."
# Tags that must be equal for two versions' metrics to be comparable, and how to name them.
COMPARABILITY_TAGS = (
    (TAG_EXTRACTOR_SHA, "feature extractor"),
    (TAG_NUM_SAMPLES, "N"),
    (TAG_NUM_REAL_SAMPLES, "number of real images"),
    (TAG_DATASET_SHA, "dataset"),
)


def git_commit(cwd: Path) -> str | None:
    """The checked-out commit, or None outside a git checkout (e.g. a Ray cluster image)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


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
    return tags


def version_tags(cfg: Config, *, weights_sha256: str, evaluation: Evaluation,
                 train_run: TrainRun, stats: DatasetStats | None, root: Path
                 ) -> dict[str, str]:
    """Every tag a registered version carries (module docstring lists them)."""
    tags = {TAG_WEIGHTS_SHA: weights_sha256, **evaluation_tags(evaluation)}
    tags.update({f"param.{key}": str(value) for key, value in to_flat_dict(cfg).items()})
    tags[TAG_DATASET_SHA] = stats.dataset_sha256 if stats else "unknown"
    tags["mlflow_run_id"] = train_run.mlflow_run_id
    tags["ray_run_name"] = train_run.ray_run_name
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
    return tags
