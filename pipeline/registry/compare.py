"""Compare training runs: a table of what differs, and their samples from the same noise.

The MLflow UI compares params and metric curves, but not what the generators draw from the same
noise. Here every selected run's logged generator (see `pipeline.registry`) turns the SAME
fixed noise into a grid, and the grids are put side by side in one image, captioned with the
run names. Runs are selected by id, by DVC experiment name (the runs of a sweep queued with
`dvc exp run --queue -S 'train.lr_g=0.0001,0.0003'`), by tags, or all runs of the experiment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from PIL import Image, ImageDraw

from pipeline.core.errors import UserError
from pipeline.core.provenance import TAG_DVC_EXP_NAME
from pipeline.core.tracking import EVAL_PREFIX, TRAIN_PREFIX
from pipeline.data.grids import display_copy, make_grid
from pipeline.registry.sampling import generate, latent_noise, latent_nz, load_generator_model
from pipeline.registry.tags import METRIC_TAG_PREFIX

log = logging.getLogger(__name__)

# Metrics worth a column: evaluation quality and coverage, final losses, throughput.
KEY_METRIC_PREFIXES = (
    "fid",
    "kid",
    "classifier_score",
    "classes_hit",
    "class_coverage",
    "class_entropy",
    "loss_g",
    "loss_d",
)
TABLE_FORMATS = {".csv": "csv", ".md": "markdown"}
CAPTION_HEIGHT_PX = 14
GAP_PX = 8
CAPTION_CHAR_PX = 6  # PIL's default bitmap font


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment named {experiment!r}")
    return found.experiment_id


def logged_model_uri(client: MlflowClient, run: Run) -> str | None:
    """`models:/<model_id>` of the newest model logged into `run`, or None."""
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    newest = max(models, key=lambda m: m.creation_timestamp, default=None)
    return None if newest is None else f"models:/{newest.model_id}"


@dataclass(frozen=True)
class RunSelection:
    """Which runs to compare: explicit run ids, or the runs of DVC experiments (by name), or
    every run of the experiment; each narrowed to the runs carrying all `tags`."""

    run_ids: Sequence[str] = ()
    dvc_experiments: Sequence[str] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """How a person would say it, for error messages."""
        parts = [f"{key}={value}" for key, value in self.tags.items()]
        if self.dvc_experiments:
            parts.insert(0, f"DVC experiments {', '.join(self.dvc_experiments)}")
        return " and ".join(parts) or "any run"


def parse_tag_filters(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings -> {KEY: VALUE}; UserError on a malformed one."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "'" in value or "`" in key:
            raise UserError(f"--tag {item!r}: expected KEY=VALUE (no quotes)")
        tags[key] = value
    return tags


def _filter_string(tags: Mapping[str, str]) -> str:
    # Backticks: tag keys hold dots (`dvc.exp_name`), which MLflow's grammar otherwise splits.
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def _get_runs(client: MlflowClient, run_ids: Sequence[str]) -> list[Run]:
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as err:
            raise UserError(f"no MLflow run {run_id}") from err
    return runs


def _by_dvc_experiment(runs: Sequence[Run], names: Sequence[str], experiment: str) -> list[Run]:
    """The runs tagged with each DVC experiment name, in the order of `names`."""
    found: dict[str, list[Run]] = {}
    for run in runs:
        found.setdefault(run.data.tags.get(TAG_DVC_EXP_NAME, ""), []).append(run)
    missing = [name for name in names if name not in found]
    if missing:
        raise UserError(
            f"no run of MLflow experiment {experiment!r} is tagged {TAG_DVC_EXP_NAME}="
            f"{missing[0]} (`dvc exp show` lists the names; an experiment whose train stage "
            "DVC restored from its cache has the run of the experiment that trained it)"
        )
    return [run for name in names for run in found[name]]


def select_runs(client: MlflowClient, experiment: str, selection: RunSelection) -> list[Run]:
    """The runs `selection` names, oldest first unless given by id or DVC experiment name."""
    if selection.run_ids:
        wanted = selection.tags.items()
        return [run for run in _get_runs(client, selection.run_ids)
                if all(run.data.tags.get(key) == value for key, value in wanted)]
    runs = client.search_runs(
        [_experiment_id(client, experiment)], filter_string=_filter_string(selection.tags),
        order_by=["attributes.start_time ASC"],
    )
    if selection.dvc_experiments:
        runs = _by_dvc_experiment(runs, selection.dvc_experiments, experiment)
    return runs


def runs_with_models(
    client: MlflowClient, experiment: str, selection: RunSelection
) -> list[tuple[Run, str]]:
    """(run, model URI) for the selected runs; UserError when one named explicitly has no
    logged generator, or when none has."""
    runs = select_runs(client, experiment, selection)
    pairs = [(run, logged_model_uri(client, run)) for run in runs]
    if selection.run_ids or selection.dvc_experiments:
        missing = [run.info.run_id for run, uri in pairs if uri is None]
        if missing:
            raise UserError(f"run {missing[0]} has no logged generator: run register for it")
    pairs = [(run, uri) for run, uri in pairs if uri is not None]
    if not pairs:
        raise UserError(
            f"no run of experiment {experiment!r} with {selection.describe()} has a logged "
            "generator"
        )
    return pairs


def _registered_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """Evaluation metrics tagged on the registered versions of this run's model."""
    metrics: dict[str, float] = {}
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        for key, value in version.tags.items():
            if key.startswith(METRIC_TAG_PREFIX):
                metrics.setdefault(key[len(METRIC_TAG_PREFIX) :], float(value))
    return metrics


def _key_metrics(client: MlflowClient, run: Run) -> dict[str, float]:
    """The run's key metrics under their plain names (`eval/fid_classifier` ->
    `fid_classifier`, the final `train/loss_d` -> `loss_d`); registry tags fill the gaps."""
    metrics = _registered_metrics(client, run.info.run_id)
    for key, value in run.data.metrics.items():
        metrics[key.removeprefix(EVAL_PREFIX).removeprefix(TRAIN_PREFIX)] = value
    return {k: v for k, v in sorted(metrics.items()) if k.startswith(KEY_METRIC_PREFIXES)}


def comparison_table(client: MlflowClient, runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: id, name, its DVC experiment (if any run has one), the params that
    differ between the runs, key metrics."""
    params = pd.DataFrame([run.data.params for run in runs])
    differing = [c for c in params.columns if params[c].nunique(dropna=False) > 1]
    identity = {
        "run_id": [r.info.run_id for r in runs],
        "run_name": [r.info.run_name for r in runs],
    }
    experiments = [r.data.tags.get(TAG_DVC_EXP_NAME) for r in runs]
    if any(experiments):
        identity["dvc_exp"] = experiments
    return pd.concat(
        [
            pd.DataFrame(identity),
            params[sorted(differing)].add_prefix("param."),
            pd.DataFrame([_key_metrics(client, run) for run in runs]),
        ],
        axis=1,
    )


def write_table(table: pd.DataFrame, path: Path) -> Path:
    """Write `table` as CSV or markdown, chosen by the suffix (.csv, .md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if TABLE_FORMATS[path.suffix] == "csv":
        table.to_csv(path, index=False)
    else:
        path.write_text(table.to_markdown(index=False) + "\n")
    return path


def side_by_side(panels: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """Put captioned images left to right on black, top-aligned; a caption is cut to the
    width of its image."""
    images = [image.convert("RGB") for _, image in panels]
    width = sum(image.width for image in images) + GAP_PX * (len(images) - 1)
    height = CAPTION_HEIGHT_PX + max(image.height for image in images)
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for (caption, _), image in zip(panels, images, strict=True):
        draw.text((left + 2, 1), caption[: image.width // CAPTION_CHAR_PX],
                  fill=(255, 255, 255))
        canvas.paste(image, (left, CAPTION_HEIGHT_PX))
        left += image.width + GAP_PX
    return canvas


def compare_runs(
    client: MlflowClient,
    experiment: str,
    selection: RunSelection,
    out_image: Path,
    table_path: Path | None = None,
    *,
    samples_per_run: int = 16,
    seed: int = 0,
) -> pd.DataFrame:
    """Write `out_image` (each selected run's grid from the same noise, enlarged to be read)
    and, optionally, `table_path`; return the table."""
    if table_path is not None and table_path.suffix not in TABLE_FORMATS:
        raise UserError(f"--table must end with {' or '.join(TABLE_FORMATS)}, got {table_path}")
    pairs = runs_with_models(client, experiment, selection)
    models = [load_generator_model(uri) for _, uri in pairs]
    nz_values = [latent_nz(model) for model in models]
    # One draw for every run: each model reads the first nz columns of the same noise.
    noise = latent_noise(samples_per_run, max(nz_values), seed)
    per_row = math.ceil(math.sqrt(samples_per_run))
    panels = []
    for (run, _), model, nz in zip(pairs, models, nz_values, strict=True):
        images = torch.from_numpy(generate(model, noise[:, :nz].copy()))
        grid = display_copy(make_grid(images, per_row))
        panels.append((run.info.run_name or run.info.run_id[:8], grid))
    out_image.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(panels).save(out_image, format="PNG")
    table = comparison_table(client, [run for run, _ in pairs])
    if table_path is not None:
        write_table(table, table_path)
    log.info("compared %d runs: %s", len(pairs), out_image)
    return table
