"""The one module that runs Ray Train: TorchTrainer and the per-worker glue.

Driver (`resolve_cluster`, `fit`): joins the cluster (`connect`), makes auto workers explicit,
runs `TorchTrainer` (DDP ranks, retries with `FailureConfig`) and hands back the FINAL
checkpoint's state, so outputs are written on the driver even when rank 0 ran on another node.

Worker (`train_worker`): resumes from `ray.train.get_checkpoint()`, runs `loop.TrainLoop` (which
places and wraps its models itself, `placement`, as Ray's `prepare_model` would) with hooks that
report checkpoints on every rank, log to MLflow on rank 0 only, and fire the fault that the
plan carries (tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import Config
from pipeline.core.connect import connect_ray, job_logs_command, started_here
from pipeline.core.errors import UserError
from pipeline.data.cache import training_batches
from pipeline.metrics.probe import QualityProbe
from pipeline.train import checkpoints, mlflow_run, placement, resume
from pipeline.train.collectives import all_gather_hex
from pipeline.train.loop import LoopEnv, LoopResult, TrainLoop
from pipeline.train.preflight import (
    NodeResources,
    TrainPlan,
    WorkerPlan,
    check_resources,
    resolve_workers,
    worker_plan,
)
from pipeline.train.tracking_buffer import TrackingBuffer

logger = logging.getLogger(__name__)

CHECKPOINTS_TO_KEEP = 2
ABORT_TIMEOUT_S = 30.0  # Ctrl-C: how long the controller may take to stop the workers
BUFFER_DRAIN_S = 10.0  # rank 0's wait at the end for a tracking server that does not answer
WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# Ray Train's controller collects each worker's report at its poll, and a worker's second
# report waits for the first to be collected (a queue of one): at Ray's 2 s a checkpoint every
# second stalls the workers half the time, and every fit spends ~4 polls starting and ending.
# The driver propagates it to the controller; an operator's own value wins.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.25"
# Ray Train watches every worker group for nodes being drained (spot preemption, autoscaler
# scale-down) with an actor of its own (~2.5 s of CPU to start, measured). A Ray started by the
# stage itself is one node that nothing drains: there the watcher is off, unless the operator
# set it.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


# --- worker side ----------------------------------------------------------------------------------


class RayHooks:
    """`loop.LoopHooks` on Ray Train: checkpoints via report, MLflow on rank 0, fault
    injection."""

    def __init__(self, rank: int, plan: WorkerPlan) -> None:
        self.rank = rank
        self.plan = plan
        self.fault_marker = Path(plan.fault_marker)
        train = plan.config.train
        # MLflow steps count images seen, so runs of any worker count overlay.
        self.global_batch = train.batch_size * train.num_workers
        # Rank 0's tracking goes through a buffer: a server that does not answer never stalls
        # a step (pipeline.train.tracking_buffer).
        self.buffer = (TrackingBuffer(plan.tracking_uri, plan.mlflow_run_id,
                                      Path(plan.spill_dir)) if rank == 0 else None)

    def _new(self, kind: str, step: int) -> bool:
        """False for what a resumed MLflow run already holds (its history is not repeated)."""
        return step > self.plan.logged_through.get(kind, -1)

    def before_step(self, step: int) -> None:
        fault = self.plan.fault
        if fault is None or not fault.is_due(step, self.rank, self.fault_marker):
            return
        import ray.train

        # The controller registers a reported checkpoint at its next poll (~2 s later); wait
        # for it, so "a crash after checkpoint N" always resumes from N, however fast steps are.
        ray.train.get_all_reported_checkpoints(timeout_s=60)
        fault.fire(step, self.rank, self.fault_marker)

    def save_checkpoint(self, state: checkpoints.TrainState | None,
                        metrics: dict[str, Any]) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="dcgan_ckpt_") as directory:
            checkpoints.save_state(state, directory)
            # The step, readable without loading the state: the driver's resume line.
            (Path(directory) / resume.PROGRESS_FILE).write_text(
                json.dumps({"step": state["step"]}) + "\n")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def log_rows(self, rows: list[dict[str, float]]) -> None:
        assert self.buffer is not None  # the loop logs on rank 0 only
        self.buffer.metrics([row for row in mlflow_run.metric_rows(rows, self.global_batch)
                             if self._new("rows", row["step"])])

    def log_quality(self, rows: list[dict[str, float]]) -> None:
        assert self.buffer is not None
        self.buffer.metrics([row for row in mlflow_run.quality_metric_rows(rows)
                             if self._new("quality", row["step"])])

    def publish_grid(self, epoch: int, step: int, images: torch.Tensor) -> None:
        assert self.buffer is not None
        if self._new("grids", step * self.global_batch):
            self.buffer.image(mlflow_run.grid_image(images), mlflow_run.GRID_KEY,
                              step * self.global_batch)

    def close(self) -> None:
        """Rank 0: let the buffer drain for a bounded time; the rest waits in the spill folder
        (the driver says so)."""
        if self.buffer is not None:
            self.buffer.close(BUFFER_DRAIN_S)


def train_worker(plan: WorkerPlan) -> LoopResult:
    """Ray Train's per-worker function: resume if there is a checkpoint, then train."""
    import ray
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg: Config = plan.config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    device = ray.train.torch.get_device()
    placement.configure_process(device)

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = checkpoints.load_state(directory)

    env = LoopEnv(rank, world_size, device, plan.steps_per_epoch)
    probe = QualityProbe(plan.quality, device) if rank == 0 and plan.quality else None
    # The buffer's sender retries by itself: one quick attempt per MLflow request.
    os.environ.update(WORKER_HTTP_ENV)
    hooks = RayHooks(rank, plan)
    loop = TrainLoop(cfg, env, hooks, state, probe)
    batches = training_batches(
        plan.urls, cache=cfg.train.data_cache, split_shape=plan.split_shape,
        batch_size=cfg.train.batch_size, rank=rank, world_size=world_size,
        num_batches=plan.steps_per_epoch, seed=cfg.train.seed, device=device,
        decode_processes=cfg.train.cpus_per_worker, loader_workers=cfg.train.loader_workers,
    )
    try:
        outcome = loop.run(batches)
    finally:
        hooks.close()  # also when this attempt fails: what was queued is spilled, not lost
    node_id = ray.get_runtime_context().get_node_id()
    return dataclasses.replace(outcome, worker_node_ids=all_gather_hex(node_id, world_size))


# --- driver side ----------------------------------------------------------------------------------


def resolve_cluster(cfg: Config) -> Config:
    """Connect; make auto (0) workers and CPUs explicit from the alive nodes (logged); then
    UserError unless the cluster has the resources the workers reserve."""
    ray = connect_ray()
    nodes = [NodeResources(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
             for node in ray.nodes() if node.get("Alive")]
    train, reason = resolve_workers(cfg.train, nodes)
    logger.info("train: %d worker(s) x %d CPU(s)%s (%s)", train.num_workers,
                train.cpus_per_worker, " + 1 GPU" if train.use_gpu else "", reason)
    cfg = dataclasses.replace(cfg, train=train)
    check_resources(cfg, ray.cluster_resources())
    return cfg


def set_controller_env(ray_started_here: bool) -> None:
    """The Ray Train settings the driver hands its controller (Ray propagates these variables):
    the fast poll, and no preemption watcher on a Ray of the stage's own. An operator's own
    values win."""
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    if ray_started_here:
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def _fit(cfg: Config, plan: TrainPlan, run_name: str, run_id: str,
         logged_through: dict[str, int]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    set_controller_env(ray_started_here=started_here())
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_plan(cfg, plan, run_name, run_id, logged_through),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
    )
    _stop_on_signals(trainer)
    _without_datasets_actor(trainer)
    return trainer.fit()


def _without_datasets_actor(trainer: Any) -> None:
    """No Ray Data dataset manager for a fit that has no Ray Data datasets (ours read their
    shards themselves). Ray Train 2.60 starts that actor for every fit regardless
    (`DatasetsCallback` among `DataParallelTrainer._create_default_callbacks`): a worker process
    that imports Ray Data, for nothing (a 70-step fit: 49.0 -> 43.8 s of CPU, BENCHMARKS.md 2)."""
    create = getattr(trainer, "_create_default_callbacks", None)
    if create is None or getattr(trainer, "datasets", None):
        return  # another Ray, or datasets after all: Ray's own callbacks stay
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    def without_datasets() -> list:
        return [callback for callback in create() if not isinstance(callback, DatasetsCallback)]

    trainer._create_default_callbacks = without_datasets


def _stop_on_signals(trainer: Any) -> None:
    """Ctrl-C and SIGTERM abort the run as Ray's own SIGINT handler does (the controller stops
    the workers), then raise KeyboardInterrupt, so the stage marks the MLflow run KILLED and
    says how to continue. Ray's handler (`DataParallelTrainer._register_sigint_handler`, Ray
    2.60) ends the driver with `sys.exit` instead, and leaves SIGTERM alone."""
    if not hasattr(trainer, "_register_sigint_handler"):
        return  # another Ray: its own handling stays

    def register(controller: Any) -> None:
        import signal

        import ray

        def stop(signum: int, frame: object) -> None:
            logger.info("%s: stopping the workers", signal.Signals(signum).name)
            # The controller ends itself on abort (RayActorError); the driver's exit the rest.
            with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    trainer._register_sigint_handler = register


def _root_cause(err: BaseException) -> str:
    """The most telling line of a worker-group error: the first `SomethingError: ...` line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (causes or lines or [type(err).__name__])[0]


def fit(
    cfg: Config, plan: TrainPlan, run_name: str, run_id: str,
    logged_through: dict[str, int] | None = None,
) -> tuple[checkpoints.TrainState, LoopResult, str]:
    """Fit (a run of `run_name` on storage continues from its newest checkpoint: Ray Train
    restores it); return (final checkpoint state, rank 0's loop result, its path) or raise
    UserError. `logged_through`: what MLflow run `run_id` already holds (`resume.RunChoice`)."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    try:
        result = _fit(cfg, plan, run_name, run_id, logged_through or {})
    except TrainingFailedError as err:
        logs = job_logs_command()  # under `ray job submit`: where the whole log is
        raise UserError(
            f"training failed after {cfg.train.max_failures} restart(s): {_root_cause(err)} "
            f"(checkpoints: {plan.storage_path}/{run_name})"
            + (f"; the whole log: {logs}" if logs else "")
        ) from err
    outcome: LoopResult | None = result.return_value
    if outcome is None:
        raise UserError(f"training ended without a result ({plan.storage_path}/{run_name})")
    if outcome.nonfinite_step is not None:
        last = result.checkpoint.path if result.checkpoint else "none"
        raise UserError(
            f"loss became NaN/inf at step {outcome.nonfinite_step}: training stopped; "
            f"last good checkpoint: {last} (try lower train.lr_d/train.lr_g)"
        )
    if result.checkpoint is None:
        raise UserError(f"training ended without a checkpoint ({plan.storage_path}/{run_name})")
    with result.checkpoint.as_directory() as directory:
        state = checkpoints.load_state(directory)
    return state, outcome, result.checkpoint.path

