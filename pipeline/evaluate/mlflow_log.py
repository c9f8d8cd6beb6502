"""What evaluate adds to the training's MLflow run (README, "Comparing runs").

* Metrics: every score as `eval/<name>` and the headline `fid` (the tag `fid.extractor` names
  the extractor it was measured with), at step = the images the generator was trained on, so
  that FID sits where the training curves end.
* Tags: the settings and counts (N, real N, floor N, KID subset, generator steps, extractor and
  its hash, the collapse verdict) as `eval.*`: they are not curves.
* The description (`mlflow.note.content`): one line with epochs, learning rates, workers, FID
  against its floor, the collapse verdict, the commit and the DVC experiment.
* Images: the evaluated generator's `samples.png` as the image `eval/samples`, logged at one
  step only, so that its card in the run's charts opens on the trained samples (MLflow's image
  cards open at their lowest step: `train/samples` opens on the untrained generator at 0).
* Artifacts: `samples.png` and `interpolation.png` at the root, enlarged to be read (the
  compare page shows root-level images side by side); the record, its metrics and the reals
  under `evaluation/`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from pipeline.core import provenance, tracking
from pipeline.core.records import Evaluation
from pipeline.data.grids import save_display_copy

TAG_FID_EXTRACTOR = "fid.extractor"
EVAL_TAG_PREFIX = "eval."
EVALUATION_DIR = "evaluation"
SAMPLES_IMAGE_KEY = tracking.EVAL_PREFIX + "samples"
COMMIT_CHARS = 7


def headline_fid(record: Evaluation) -> float | None:
    """The FID of the extractor the evaluation used, or None when FID was skipped."""
    return record.scores.get(f"fid_{record.feature_extractor}")


def metrics(record: Evaluation) -> dict[str, float]:
    """`eval/<score>` for every score, and the headline `fid`."""
    found = {tracking.EVAL_PREFIX + key: float(value) for key, value in record.scores.items()}
    fid = headline_fid(record)
    if fid is not None:
        found[tracking.HEADLINE_FID] = float(fid)
    return found


def tags(record: Evaluation) -> dict[str, str]:
    """The evaluation's settings, counts and verdicts as `eval.*` tags, and `fid.extractor`."""
    collapse = record.mode_collapse
    settings = {
        "feature_extractor": record.feature_extractor,
        "feature_extractor_sha256": record.feature_extractor_sha256,
        "num_samples": record.num_samples,
        "num_real_samples": record.num_real_samples,
        "floor_num_samples": record.floor_num_samples,
        "kid_subset_size": record.kid_subset_size,
        "generator_steps": record.generator_steps,
        "mode_collapse": None if collapse is None else str(collapse).lower(),
        "fid_skipped_reason": record.fid_skipped_reason,
        "class_metrics_skipped_reason": record.class_metrics_skipped_reason,
        "weak_classifier": record.weak_classifier_reason,
    }
    found = {EVAL_TAG_PREFIX + key: str(value) for key, value in settings.items()
             if value is not None}
    if headline_fid(record) is not None:
        found[TAG_FID_EXTRACTOR] = record.feature_extractor
    return found


def _fid_words(record: Evaluation) -> str:
    fid = headline_fid(record)
    if fid is None:
        return "no FID (no feature extractor)"
    floor = record.scores.get(f"fid_{record.feature_extractor}_floor")
    against = f" vs floor {floor:.2f}" if floor is not None else ""
    weak = (f", WEAK: {record.weak_classifier_reason}"
            if record.feature_extractor == "classifier" and record.weak_classifier_reason else "")
    raw = record.scores.get(f"fid_{record.feature_extractor}_raw")
    last = f", last weights {raw:.2f}" if raw is not None else ""
    return (f"FID {fid:.2f}{against}{last} ({record.feature_extractor}{weak}, "
            f"N={record.num_samples})")


def _collapse_words(record: Evaluation) -> str:
    if record.mode_collapse is None:
        return "class coverage not measured"
    classes = record.classes_hit_words()
    return f"MODE COLLAPSE ({classes})" if record.mode_collapse else f"no mode collapse ({classes})"


def _count(number: str, noun: str) -> str:
    return f"{number} {noun}" if number == "1" else f"{number} {noun}s"


def description(record: Evaluation, params: Mapping[str, str], run_tags: Mapping[str, str],
                quality: str | None = None) -> str:
    """The run's one-line description, from the evaluation, the run's params and tags and
    what its quality while training says."""
    def param(key: str) -> str:
        return params.get(key, "?")

    parts = [
        f"{param('train.epochs')} epochs",
        f"lr_g {param('train.lr_g')}, lr_d {param('train.lr_d')}",
        f"{_count(param('train.num_workers'), 'worker')} × batch {param('train.batch_size')}",
        _fid_words(record),
        _collapse_words(record),
        *([quality] if quality else []),
    ]
    commit = run_tags.get(provenance.TAG_GIT_COMMIT)
    if commit:
        parts.append(f"commit {commit[:COMMIT_CHARS]}")
    experiment = run_tags.get(provenance.TAG_DVC_EXP_NAME)
    if experiment:
        parts.append(f"dvc exp {experiment}")
    return " · ".join(parts)


def log_evaluation(tracking_uri: str, run_id: str, record: Evaluation, *, step: int,
                   root_images: Sequence[Path], files: Sequence[Path],
                   quality: str | None = None) -> None:
    """Log `record` to the training run `run_id`: metrics at `step`, tags, the description
    (with `quality`, the phrase on its quality while training); display copies of
    `root_images` (samples first) at the artifact root, `files` under evaluation/."""
    tracking.log_metrics(tracking_uri, run_id, metrics(record), step=step)
    with Image.open(root_images[0]) as samples:
        tracking.log_image(tracking_uri, run_id, samples.copy(), SAMPLES_IMAGE_KEY, step)
    tracking.set_tags(tracking_uri, run_id, tags(record))
    params, run_tags = tracking.run_params_and_tags(tracking_uri, run_id)
    tracking.set_description(tracking_uri, run_id,
                             description(record, params, run_tags, quality))
    with tempfile.TemporaryDirectory(prefix="dcgan_display_") as folder:
        for image in root_images:
            copy = save_display_copy(image, Path(folder) / image.name)
            tracking.log_artifact(tracking_uri, run_id, copy)
    for path in files:
        tracking.log_artifact(tracking_uri, run_id, path, EVALUATION_DIR)
