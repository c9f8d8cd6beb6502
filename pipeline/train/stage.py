"""The `train` stage: preflight, the MLflow run, the Ray Train run, and the stage outputs
(generator weights and record, training log, per-epoch grids, the train_run record) written
from the final checkpoint."""

from __future__ import annotations

import csv
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core import tracking
from pipeline.core.config import Config
from pipeline.core.files import sha256_file
from pipeline.core.layout import Layout
from pipeline.core.records import GeneratorRecord, TrainRun
from pipeline.data.grids import save_grid
from pipeline.data.pixels import to_signed
from pipeline.train import connect, mlflow_run, ray_runner
from pipeline.train.loop import LOG_COLUMNS
from pipeline.train.preflight import check_inputs, make_plan

logger = logging.getLogger(__name__)


def write_outputs(state: dict[str, Any], layout: Layout) -> GeneratorRecord:
    """Stage outputs from a final checkpoint: generator weights + record, log CSV, grids."""
    weights = layout.generator_weights
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state["generator"], weights)
    record = GeneratorRecord(spec=state["spec"], steps=state["step"],
                             images_seen=state["images_seen"], sha256=sha256_file(weights))
    record.save(layout)

    layout.train_log.parent.mkdir(parents=True, exist_ok=True)
    with layout.train_log.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in LOG_COLUMNS} for row in state["log_rows"])

    grids_dir = layout.train_grids_dir
    for old in grids_dir.glob("epoch_*.png"):
        old.unlink()  # a shorter rerun must not leave grids of epochs it never had
    for epoch, pixels in enumerate(state["grids"], start=1):
        save_grid(to_signed(pixels), grids_dir / f"epoch_{epoch:03d}.png",
                  nrow=mlflow_run.GRID_COLUMNS)
    return record


def keep_outputs(tracking_uri: str, run_id: str, layout: Layout) -> None:
    """Log the stage's outputs to its run (`tracking.TRAIN_RUN_ARTIFACTS`): under `ray job
    submit` the local files vanish with the job; `python -m pipeline import-run` fetches them."""
    for artifact, relative in tracking.TRAIN_RUN_ARTIFACTS.items():
        local = layout.path(relative)
        folder = str(Path(artifact).parent) if Path(artifact).parent != Path(".") else ""
        if local.is_dir():
            tracking.log_artifacts(tracking_uri, run_id, local, artifact)
        else:
            tracking.log_artifact(tracking_uri, run_id, local, folder)


def train(cfg: Config, layout: Layout) -> TrainRun:
    """The train stage: preflight, Ray Train run, outputs; returns the train_run record."""
    inputs = check_inputs(cfg, layout)  # the cheap checks, before Ray starts
    requested, cfg = cfg, ray_runner.resolve_cluster(cfg)
    plan = make_plan(cfg, inputs)
    run_name = f"dcgan-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    identity = mlflow_run.identity(cfg, layout, run_name, requested)
    run_id, experiment_id = tracking.start_run(
        plan.tracking_uri, cfg.mlflow.experiment, identity.params, run_name=identity.name,
        tags={**identity.tags, tracking.TAG_STAGE: "train"},
    )
    job = connect.submission_id()
    if job:
        tracking.set_tags(plan.tracking_uri, run_id, {tracking.JOB_TAG: job})
    tracking.log_text(plan.tracking_uri, run_id, mlflow_run.config_yaml(requested),
                      mlflow_run.CONFIG_ARTIFACT)
    logger.info(
        "training %d epochs x %d steps on %d worker(s); MLflow run %s (%r); Ray run %s",
        cfg.train.epochs, plan.steps_per_epoch, cfg.train.num_workers, run_id, identity.name,
        run_name,
    )
    started = time.perf_counter()
    try:
        state, outcome, final_checkpoint = ray_runner.fit(cfg, plan, run_name, run_id)
    except BaseException:
        tracking.end_run(plan.tracking_uri, run_id, "FAILED")
        raise
    generator = write_outputs(state, layout)
    elapsed_s = time.perf_counter() - started
    rows = state["log_rows"]
    record = TrainRun(
        mlflow_run_id=run_id,
        mlflow_experiment_id=experiment_id,
        tracking_uri=plan.tracking_uri,
        ray_run_name=run_name,
        ray_storage_path=plan.storage_path,
        final_checkpoint=final_checkpoint,
        steps=state["step"],
        epochs=cfg.train.epochs,
        steps_per_epoch=plan.steps_per_epoch,
        images_seen=state["images_seen"],
        world_size=cfg.train.num_workers,
        generator_sha256=generator.sha256,
        wall_s=round(elapsed_s, 1),
        worker_node_ids=outcome.get("worker_node_ids", []),
        resumed_from_steps=outcome["resumed_from_steps"],
        params_identical_across_ranks=len(set(outcome["param_sha256_by_rank"])) == 1,
        final_loss_d=rows[-1]["loss_d"] if rows else None,
        final_loss_g=rows[-1]["loss_g"] if rows else None,
        mean_images_per_s=sum(r["images_per_s"] for r in rows) / len(rows) if rows else None,
        dataset_sha256=plan.dataset_sha256,
        ray_job_submission_id=job,
    )
    record.save(layout)
    keep_outputs(plan.tracking_uri, run_id, layout)
    mlflow_run.log_epoch_grids(plan.tracking_uri, run_id,
                               sorted(layout.train_grids_dir.glob("epoch_*.png")))
    tracking.end_run(plan.tracking_uri, run_id, "FINISHED")
    logger.info("trained %d steps in %.0f s; generator: %s; MLflow run %s", state["step"],
                elapsed_s, layout.generator_weights, run_id)
    return record
