"""How a training run looks in MLflow: the name a person recognises it by, the parameters that
shape it, its tags, and the names and steps of its metrics and grids (README, "Comparing runs").

* Name: what differs from the committed params.yaml (`lr_g=0.0001 epochs=2`), after the DVC
  experiment's name when there is one (`comic-mean: lr_g=0.0001`); with nothing that differs,
  the experiment's name, else the Ray run name.
* Params: RUN_PARAM_KEYS (the hyperparameters that shape a training run), the global batch,
  and every key of the sections training reads that differs from the committed params.yaml;
  the rest (data settings, storage paths, retries, logging intervals) is in `config.yaml`.
* Tags: user, source and commit (the UI's columns), the DVC experiment and its baseline commit,
  the Ray run name, the dataset hash.
* Metrics: `train/…`, `quality/…` (FID and class coverage while training) and
  `system/images_per_s` at step = training images seen; the grids as
  images (`train/samples`, the UI's slider) and, in epoch order, as `grids/epoch_NNN.png`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.core import provenance, tracking
from pipeline.core.config import PARAMS_FILE, Config, changed_keys, config_from_text, to_flat_dict
from pipeline.core.errors import ConfigError
from pipeline.core.layout import Layout
from pipeline.core.records import DatasetStats
from pipeline.data.grids import display_copy, make_grid, save_display_copy

STAGE_SCRIPT = "stages/train.py"
CONFIG_ARTIFACT = tracking.CONFIG_ARTIFACT
GRIDS_ARTIFACT_DIR = "grids"  # epoch_001.png ...: the slider's grids under names that sort
GRID_KEY = tracking.TRAIN_PREFIX + "samples"  # beside the loss charts in the UI's train section
GRID_COLUMNS = 8
TAG_RAY_RUN_NAME = "ray_run_name"
TAG_DATASET_SHA = "dataset_sha256"
# The hyperparameters that shape a training run, what a person compares runs on. Few: the UI
# prints every parameter above a run's sample grid. Any other key shows up as a parameter when
# it differs from the committed params.yaml; the dataset is the tag `dataset_sha256`; all of it
# is in `config.yaml`.
RUN_PARAM_KEYS = (
    "model.nz", "model.ngf", "model.ndf",
    "train.num_workers", "train.batch_size", "train.epochs", "train.lr_g", "train.lr_d",
    "train.beta1", "train.seed",
)
TRAINING_SECTIONS = ("data.", "model.", "train.")  # what the train stage reads
NAME_PREFIX_DROPPED = "train."  # `lr_g=0.0001` reads better than `train.lr_g=0.0001`
NAME_MAX_CHARS = 120
# Train-log column -> MLflow metric key.
METRIC_KEYS = {
    "loss_d": tracking.TRAIN_PREFIX + "loss_d",
    "loss_g": tracking.TRAIN_PREFIX + "loss_g",
    "d_real": tracking.TRAIN_PREFIX + "d_real",  # D(x)
    "d_fake": tracking.TRAIN_PREFIX + "d_fake",  # D(G(z))
    "augment_p": tracking.TRAIN_PREFIX + "augment_p",  # the augmentation probability
    "ada_rt": tracking.TRAIN_PREFIX + "ada_rt",  # ADA's r_t = E[sign(D(augmented real))]
    "images_per_s": tracking.SYSTEM_PREFIX + "images_per_s",
}
# Quality-row column -> MLflow metric key: a section of its own, charted against images seen.
QUALITY_KEYS = {
    "fid_classifier": tracking.QUALITY_PREFIX + "fid_classifier",
    "class_coverage": tracking.QUALITY_PREFIX + "class_coverage",
}


@dataclass(frozen=True)
class RunIdentity:
    """What a training run is created with."""

    name: str
    params: dict[str, Any]
    tags: dict[str, str]


def committed_config(layout: Layout) -> Config | None:
    """The config of the params.yaml committed at HEAD, or None (no git, not committed, or
    params that no longer validate)."""
    text = provenance.committed_text(layout.root, PARAMS_FILE.as_posix())
    if text is None:
        return None
    try:
        return config_from_text(text, f"HEAD:{PARAMS_FILE}")
    except ConfigError:
        return None


def training_changes(cfg: Config, baseline: Config | None) -> dict[str, Any]:
    """The keys training reads whose value differs from `baseline` (none without one)."""
    if baseline is None:
        return {}
    return {key: value for key, value in changed_keys(cfg, baseline).items()
            if key.startswith(TRAINING_SECTIONS)}


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(changes: Mapping[str, Any], experiment: provenance.DvcExperiment | None,
             fallback: str) -> str:
    """`<experiment>: key=value ...` for what differs; the parts there are; else `fallback`."""
    differs = " ".join(f"{key.removeprefix(NAME_PREFIX_DROPPED)}={_shown(value)}"
                       for key, value in changes.items())
    parts = [part for part in (experiment.name if experiment else "", differs) if part]
    name = ": ".join(parts) or fallback
    return name if len(name) <= NAME_MAX_CHARS else name[: NAME_MAX_CHARS - 1] + "…"


def run_params(cfg: Config, changes: Mapping[str, Any]) -> dict[str, Any]:
    """RUN_PARAM_KEYS and the changed keys, with the global batch they make together."""
    flat = to_flat_dict(cfg)
    params = {key: flat[key] for key in RUN_PARAM_KEYS}
    params.update(changes)
    params["train.global_batch"] = cfg.train.batch_size * cfg.train.num_workers
    return params


def identity(cfg: Config, layout: Layout, ray_run_name: str,
             requested: Config | None = None) -> RunIdentity:
    """Name, params and tags of the training run about to start in `layout`. `cfg` holds the
    resolved workers; the name compares `requested` (as asked for: auto still 0, default
    `cfg`) with the committed params, so that auto values are no difference."""
    changes = training_changes(requested or cfg, committed_config(layout))
    experiment = provenance.dvc_experiment()
    tags = {**provenance.source_tags(layout.root, STAGE_SCRIPT), TAG_RAY_RUN_NAME: ray_run_name}
    if experiment is not None:
        tags.update(experiment.tags())
    if DatasetStats.exists(layout):
        tags[TAG_DATASET_SHA] = DatasetStats.load(layout).dataset_sha256
    # A run of the committed params is that commit's baseline: say so, not the Ray run's id
    # (which stays in the tag ray_run_name).
    commit = tags.get(provenance.TAG_GIT_COMMIT, "")
    baseline = f"baseline @ {commit[:7]}" if commit else "baseline"
    return RunIdentity(run_name(changes, experiment, baseline), run_params(cfg, changes), tags)


def config_yaml(cfg: Config) -> str:
    """The full config as YAML, sections in params.yaml's order (the `config.yaml` artifact)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def metric_rows(rows: Sequence[Mapping[str, float]], global_batch: int) -> list[dict[str, float]]:
    """Train-log rows -> MLflow rows: METRIC_KEYS names, step = images seen."""
    return [
        {"step": int(row["step"]) * global_batch,
         **{key: row[column] for column, key in METRIC_KEYS.items()}}
        for row in rows
    ]


def quality_metric_rows(rows: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """In-training quality rows -> MLflow rows: QUALITY_KEYS names, step = images seen."""
    return [{"step": int(row["images_seen"]),
             **{key: row[column] for column, key in QUALITY_KEYS.items()}} for row in rows]


def grid_image(images: torch.Tensor) -> Any:
    """The fixed-noise samples (N, C, H, W) in [-1, 1] as a PIL grid large enough to read."""
    return display_copy(make_grid(images, nrow=GRID_COLUMNS))


def log_epoch_grids(tracking_uri: str, run_id: str, grid_files: Sequence[Path]) -> None:
    """Enlarged copies of the per-epoch grid files as `grids/<name>` artifacts, one upload."""
    with tempfile.TemporaryDirectory(prefix="dcgan_grids_") as folder:
        for path in grid_files:
            save_display_copy(path, Path(folder) / path.name)
        tracking.log_artifacts(tracking_uri, run_id, folder, GRIDS_ARTIFACT_DIR)
