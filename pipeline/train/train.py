"""The `train` stage: preflight, the MLflow run, the Ray Train run, and the stage outputs
(generator weights and record, training log, per-epoch grids, the train_run record) written
from the final checkpoint."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core import connect, tracking
from pipeline.core.config import Config
from pipeline.core.errors import InterruptError, UserError
from pipeline.core.files import sha256_file
from pipeline.core.layout import Layout
from pipeline.core.records import GeneratorRecord, QualitySummary, TrainRun
from pipeline.data.grids import save_grid
from pipeline.data.pixels import to_signed
from pipeline.metrics.probe import QUALITY_COLUMNS
from pipeline.train import checkpoints, mlflow_run, ray_runner, resume, tracking_buffer
from pipeline.train.loop import LOG_COLUMNS
from pipeline.train.preflight import TrainPlan, check_inputs, make_plan, spill_dir, storage_path

logger = logging.getLogger(__name__)


def _save_generators(state: checkpoints.TrainState, layout: Layout) -> GeneratorRecord:
    """generator.pt (the weight average when there is one, else the last weights), the last
    weights as generator_raw.pt (always: a fixed set of outputs), and their record."""
    weights, raw = layout.generator_weights, layout.raw_generator_weights
    weights.parent.mkdir(parents=True, exist_ok=True)
    averaged = state["generator_ema"]
    torch.save(averaged if averaged is not None else state["generator"], weights)
    torch.save(state["generator"], raw)
    saved = checkpoints.saved_config(state)
    half_life = saved.train.ema_half_life_images if averaged is not None else 0
    record = GeneratorRecord(spec=state["spec"], steps=state["step"],
                             images_seen=state["images_seen"], sha256=sha256_file(weights),
                             ema_half_life_images=half_life, raw_sha256=sha256_file(raw))
    record.save(layout)
    return record


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: row[key] for key in columns} for row in rows)


def write_outputs(state: checkpoints.TrainState, layout: Layout) -> GeneratorRecord:
    """Stage outputs from a final checkpoint: generator weights + record, the training and
    quality logs (CSV), grids."""
    record = _save_generators(state, layout)
    _write_csv(layout.train_log, LOG_COLUMNS, state["log_rows"])
    _write_csv(layout.train_quality, QUALITY_COLUMNS, state["quality_rows"])

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


def _end_quietly(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the run `status` if the server answers (a failure must not hide the first one)."""
    try:
        tracking.end_run(tracking_uri, run_id, status)
    except Exception as err:  # any failure to reach the server
        logger.warning("could not mark MLflow run %s %s: %s", run_id, status,
                       str(err).strip().splitlines()[0] if str(err).strip() else err)


def _open_run(cfg: Config, requested: Config, layout: Layout, plan: TrainPlan,
              choice: resume.RunChoice, digest: str) -> tuple[str, str]:
    """(run id, experiment id) of the MLflow run to log to: the interrupted one, RUNNING
    again, or a new one holding the identity tag."""
    job = connect.submission_id()
    if choice.resumed:
        assert choice.mlflow_run_id is not None and choice.mlflow_experiment_id is not None
        run_id, experiment_id = choice.mlflow_run_id, choice.mlflow_experiment_id
        tracking.reopen_run(plan.tracking_uri, run_id)
    else:
        identity = mlflow_run.identity(cfg, layout, choice.ray_run_name, requested)
        run_id, experiment_id = tracking.start_run(
            plan.tracking_uri, cfg.mlflow.experiment, identity.params, run_name=identity.name,
            tags={**identity.tags, tracking.TAG_STAGE: "train", resume.TAG_IDENTITY: digest},
        )
        tracking.log_text(plan.tracking_uri, run_id, mlflow_run.config_yaml(requested),
                          mlflow_run.CONFIG_ARTIFACT)
    if job:
        tracking.set_tags(plan.tracking_uri, run_id, {tracking.JOB_TAG: job})
    return run_id, experiment_id


def upload_outputs(tracking_uri: str, run_id: str, layout: Layout) -> None:
    """The stage's outputs and the enlarged epoch grids to the run (`keep_outputs`)."""
    keep_outputs(tracking_uri, run_id, layout)
    mlflow_run.log_epoch_grids(tracking_uri, run_id,
                               sorted(layout.train_grids_dir.glob("epoch_*.png")))


def finish_tracking(tracking_uri: str, run_id: str, layout: Layout, spill: Path,
                    description: str | None) -> None:
    """The end of the run in MLflow, best effort: what rank 0 spilled, the outputs, the
    description, FINISHED. What the server does not take waits in `spill` and one line says
    so, with the command that uploads it later; the stage's own outputs are already written."""
    try:
        if tracking_buffer.pending(spill).spill_dir:
            tracking_buffer.sync(spill, tracking_uri, run_id)  # the server may be back
        upload_outputs(tracking_uri, run_id, layout)
        tracking.end_run(tracking_uri, run_id, "FINISHED")
        if description:
            tracking.set_description(tracking_uri, run_id, description)
        return
    except Exception as err:  # any failure to reach the server
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    tracking_buffer.record_driver_todo(spill, {"outputs": True, "status": "FINISHED",
                                               "description": description})
    left = tracking_buffer.pending(spill)
    logger.warning(
        "MLflow run %s is incomplete (%s): not logged: %s, the stage outputs as artifacts, the "
        "status FINISHED; they wait in %s; upload them later: python -m pipeline sync-run %s",
        run_id, reason, left.words(), spill, run_id,
    )


def run(cfg: Config, layout: Layout) -> TrainRun:
    """The train stage: preflight, Ray Train run (an interrupted one of the same identity
    continues: `pipeline.train.resume`), outputs; returns the train_run record."""
    inputs = check_inputs(cfg, layout)  # the cheap checks, before Ray starts
    requested, cfg = cfg, ray_runner.resolve_cluster(cfg)
    plan = make_plan(cfg, inputs)
    digest = resume.identity_digest(cfg, plan.dataset_sha256, resume.layout_classifier_sha(layout))
    choice = resume.choose_run(cfg, digest, plan.storage_path, plan.tracking_uri)
    run_name = choice.ray_run_name
    run_id, experiment_id = _open_run(cfg, requested, layout, plan, choice, digest)
    job = connect.submission_id()
    logger.info("%s", resume.resume_line(choice, plan.storage_path))
    logger.info(
        "training %d epochs x %d steps on %d worker(s); MLflow run %s; Ray run %s; "
        "quality while training: %s", cfg.train.epochs, plan.steps_per_epoch,
        cfg.train.num_workers, run_id, run_name, plan.quality_reason,
    )
    started = time.perf_counter()
    try:
        state, outcome, final_checkpoint = ray_runner.fit(cfg, plan, run_name, run_id,
                                                          choice.logged_through)
    except KeyboardInterrupt:
        _end_quietly(plan.tracking_uri, run_id, "KILLED")
        step = resume.checkpoint_step(plan.storage_path, run_name)
        raise InterruptError(
            f"interrupted: MLflow run {run_id} marked KILLED; Ray run {run_name} keeps its "
            f"checkpoints ({f'last at step {step}' if step is not None else 'none yet'}) in "
            f"{plan.storage_path}: `dvc repro` (or this same command) continues it"
        ) from None
    except BaseException:
        _end_quietly(plan.tracking_uri, run_id, "FAILED")
        raise
    generator = write_outputs(state, layout)
    elapsed_s = time.perf_counter() - started
    rows = state["log_rows"]
    quality = QualitySummary.of_rows(state["quality_rows"])
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
        worker_node_ids=outcome.worker_node_ids,
        resumed_from_steps=outcome.resumed_from_steps,
        params_identical_across_ranks=len(set(outcome.param_sha256_by_rank)) == 1,
        final_loss_d=rows[-1]["loss_d"] if rows else None,
        final_loss_g=rows[-1]["loss_g"] if rows else None,
        mean_images_per_s=sum(r["images_per_s"] for r in rows) / len(rows) if rows else None,
        dataset_sha256=plan.dataset_sha256,
        ray_job_submission_id=job,
        quality=quality,
        quality_s=round(outcome.quality_s, 1),
        quality_skipped_reason=None if plan.quality else plan.quality_reason,
    )
    record.save(layout)
    resume.mark_finished(plan.storage_path, run_name, run_id)
    finish_tracking(plan.tracking_uri, run_id, layout, spill_dir(plan.storage_path, run_name),
                    f"trained: {quality.words()}" if quality is not None else None)
    logger.info("trained %d steps in %.0f s; generator: %s; MLflow run %s; %s", state["step"],
                elapsed_s, layout.generator_weights, run_id,
                quality.words() if quality else plan.quality_reason)
    return record


def sync_run(cfg: Config, layout: Layout, tracking_uri: str, run_id: str) -> str:
    """`python -m pipeline sync-run RUN_ID`: upload what a train run could not log (its spill
    folder under the run's storage, and the outputs of this workspace when they are that
    run's), then mark it FINISHED. Returns what was sent, in words."""
    from mlflow.exceptions import MlflowException

    try:
        _, tags = tracking.run_params_and_tags(tracking_uri, run_id)
    except MlflowException as err:
        raise UserError(f"no MLflow run {run_id} in {tracking_uri} ({err.error_code})") from None
    spill = spill_dir(storage_path(cfg, layout), tags.get(mlflow_run.TAG_RAY_RUN_NAME, ""))
    if not tracking_buffer.pending(spill).spill_dir:
        return f"nothing to upload: {spill} holds nothing of run {run_id}"
    ours = TrainRun.exists(layout) and TrainRun.load(layout).mlflow_run_id == run_id
    if not ours:
        logger.warning("the outputs in %s are not those of run %s: not uploaded", layout.root,
                       run_id)
    sent = tracking_buffer.sync(spill, tracking_uri, run_id,
                                (lambda: upload_outputs(tracking_uri, run_id, layout))
                                if ours else None)
    return (f"run {run_id}: logged {sent.words()}" + (", the stage outputs" if ours else "")
            + " and its end status")
