"""Compare training runs: a table of what differs, and their samples from the same noise.

The MLflow UI compares params and metric curves, but not what the generators draw. Here every
run's logged generator (see `pipeline.registry`) turns the SAME fixed noise into a grid, and
the grids are put side by side in one image, captioned with the run names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from PIL import Image, ImageDraw

from pipeline.core.errors import UserError
from pipeline.data.grids import make_grid
from pipeline.registry.sampling import generate, latent_noise, latent_nz, load_generator_model
from pipeline.registry.tags import METRIC_TAG_PREFIX

log = logging.getLogger(__name__)

# Metrics worth a column: evaluation quality and coverage, final losses, throughput.
KEY_METRIC_PREFIXES = (
    "fid",
    "kid",
    "classifier_score",
    "classes_hit",
    "class_entropy",
    "loss_g",
    "loss_d",
)
TABLE_FORMATS = {".csv": "csv", ".md": "markdown"}
CAPTION_HEIGHT_PX = 14
GAP_PX = 8
CAPTION_CHARS = 28


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


def runs_with_models(
    client: MlflowClient, experiment: str, run_ids: Sequence[str] = ()
) -> list[tuple[Run, str]]:
    """(run, model URI) for `run_ids`, or for every run of `experiment` that logged a model."""
    experiment_id = _experiment_id(client, experiment)
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException as err:
                raise UserError(f"no MLflow run {run_id}") from err
    else:
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    pairs = [(run, logged_model_uri(client, run)) for run in runs]
    if run_ids:
        missing = [run.info.run_id for run, uri in pairs if uri is None]
        if missing:
            raise UserError(f"run {missing[0]} has no logged generator: run register for it")
    pairs = [(run, uri) for run, uri in pairs if uri is not None]
    if not pairs:
        raise UserError(f"no run of experiment {experiment!r} has a logged generator")
    return pairs


def _registered_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """Evaluation metrics tagged on the registered versions of this run's model."""
    metrics: dict[str, float] = {}
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        for key, value in version.tags.items():
            if key.startswith(METRIC_TAG_PREFIX):
                metrics.setdefault(key[len(METRIC_TAG_PREFIX) :], float(value))
    return metrics


def comparison_table(client: MlflowClient, runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: id, name, the params that differ between the runs, key metrics."""
    params = pd.DataFrame([run.data.params for run in runs])
    differing = [c for c in params.columns if params[c].nunique(dropna=False) > 1]
    rows = []
    for run in runs:
        metrics = {**_registered_metrics(client, run.info.run_id), **run.data.metrics}
        rows.append({k: v for k, v in sorted(metrics.items()) if k.startswith(KEY_METRIC_PREFIXES)})
    table = pd.concat(
        [
            pd.DataFrame(
                {
                    "run_id": [r.info.run_id for r in runs],
                    "run_name": [r.info.run_name for r in runs],
                }
            ),
            params[sorted(differing)].add_prefix("param."),
            pd.DataFrame(rows),
        ],
        axis=1,
    )
    return table


def write_table(table: pd.DataFrame, path: Path) -> Path:
    """Write `table` as CSV or markdown, chosen by the suffix (.csv, .md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if TABLE_FORMATS[path.suffix] == "csv":
        table.to_csv(path, index=False)
    else:
        path.write_text(table.to_markdown(index=False) + "\n")
    return path


def side_by_side(panels: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """Put captioned images left to right on black, top-aligned."""
    images = [image.convert("RGB") for _, image in panels]
    width = sum(image.width for image in images) + GAP_PX * (len(images) - 1)
    height = CAPTION_HEIGHT_PX + max(image.height for image in images)
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for (caption, _), image in zip(panels, images, strict=True):
        draw.text((left + 2, 1), caption[:CAPTION_CHARS], fill=(255, 255, 255))
        canvas.paste(image, (left, CAPTION_HEIGHT_PX))
        left += image.width + GAP_PX
    return canvas


def compare_runs(
    client: MlflowClient,
    experiment: str,
    run_ids: Sequence[str],
    out_image: Path,
    table_path: Path | None = None,
    *,
    samples_per_run: int = 16,
    seed: int = 0,
) -> pd.DataFrame:
    """Write `out_image` (each run's grid from the same noise) and, optionally, `table_path`;
    return the table."""
    if table_path is not None and table_path.suffix not in TABLE_FORMATS:
        raise UserError(f"--table must end with {' or '.join(TABLE_FORMATS)}, got {table_path}")
    pairs = runs_with_models(client, experiment, run_ids)
    models = [load_generator_model(uri) for _, uri in pairs]
    nz_values = [latent_nz(model) for model in models]
    # One draw for every run: each model reads the first nz columns of the same noise.
    noise = latent_noise(samples_per_run, max(nz_values), seed)
    per_row = math.ceil(math.sqrt(samples_per_run))
    panels = []
    for (run, _), model, nz in zip(pairs, models, nz_values, strict=True):
        images = torch.from_numpy(generate(model, noise[:, :nz].copy()))
        panels.append((run.info.run_name or run.info.run_id[:8], make_grid(images, per_row)))
    out_image.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(panels).save(out_image, format="PNG")
    table = comparison_table(client, [run for run, _ in pairs])
    if table_path is not None:
        write_table(table, table_path)
    log.info("compared %d runs: %s", len(pairs), out_image)
    return table
