"""The one module that talks to Ray: preflight, TorchTrainer, the per-worker glue, outputs.

Driver (`train`): checks everything a user can get wrong before any worker starts (shards and
their plan for the world size, the MLflow URI, Ray's CPUs/GPUs), creates the MLflow run, runs
`TorchTrainer` (DDP ranks, retries with `FailureConfig`), and writes the stage outputs from the
FINAL checkpoint, so it works when rank 0 runs on another node.

Worker (`_train_worker`): resumes from `ray.train.get_checkpoint()`, runs `training.TrainLoop`
with hooks that wrap models with `prepare_model`, report checkpoints on every rank, log to
MLflow on rank 0 only, and inject faults for tests (`DCGAN_FAULT_INJECT`, read here, once).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoints, data, paths, tracking
from pipeline.cli import UserError
from pipeline.config import Config, from_dict, to_flat_dict
from pipeline.files import sha256_file, write_json
from pipeline.grids import save_grid
from pipeline.training import LOG_COLUMNS, LoopEnv, TrainLoop

logger = logging.getLogger(__name__)

FAULT_ENV = "DCGAN_FAULT_INJECT"  # "step=30,rank=1,mode=raise|exit": fail once, for tests
CHECKPOINTS_TO_KEEP = 2
GRID_KEY = "samples"  # MLflow image key of the per-epoch grids
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for its entrypoint


# --- fault injection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultSpec:
    """Fail once at `step` on `rank`: raise an exception, or hard-exit the process."""

    step: int
    rank: int
    mode: str

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse "step=30,rank=1,mode=raise"; UserError on anything else."""
        try:
            fields = dict(part.split("=", 1) for part in text.split(","))
            spec = cls(int(fields["step"]), int(fields.get("rank", 0)), fields.get("mode", "raise"))
        except (KeyError, ValueError):
            spec = None
        if spec is None or spec.mode not in ("raise", "exit") or spec.step < 1:
            raise UserError(f"{FAULT_ENV}={text!r}: expected step=N,rank=R,mode=raise|exit")
        return spec


class InjectedFaultError(RuntimeError):
    """The failure `DCGAN_FAULT_INJECT` asks for."""


# --- worker side ----------------------------------------------------------------------------------


class RayHooks:
    """`training.LoopHooks` on Ray Train: DDP via prepare_model, checkpoints via report,
    MLflow on rank 0, fault injection."""

    def __init__(self, rank: int, world_size: int, plan: dict[str, Any]) -> None:
        self.rank, self.world_size = rank, world_size
        self.tracking_uri: str = plan["tracking_uri"]
        self.run_id: str = plan["mlflow_run_id"]
        fault = plan.get("fault")
        self.fault = FaultSpec(**fault) if fault else None
        self.fault_marker = Path(plan["fault_marker"])

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from ray.train.torch import prepare_model

        # Buffers are not re-broadcast before each forward: with several D forwards per
        # backward that in-place broadcast breaks autograd (pytorch#22095), and SyncBatchNorm
        # keeps the running statistics equal anyway. `forward_sync_buffers=False` (torch 2.13's
        # name) still syncs buffers once at init, which we want: all ranks start equal.
        return prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})

    def before_step(self, step: int) -> None:
        fault = self.fault
        if fault is None or step != fault.step or self.rank != fault.rank:
            return
        if self.fault_marker.exists():
            return  # already fired once in this run: the restarted attempt trains on
        import ray.train

        # The controller registers a reported checkpoint at its next poll (~2 s later); wait
        # for it, so "a crash after checkpoint N" always resumes from N, however fast steps are.
        ray.train.get_all_reported_checkpoints(timeout_s=60)
        self.fault_marker.parent.mkdir(parents=True, exist_ok=True)
        self.fault_marker.write_text(f"step={step} rank={self.rank} mode={fault.mode}\n")
        logger.warning("fault injection: %s at step %d on rank %d", fault.mode, step, self.rank)
        if fault.mode == "exit":
            os._exit(1)  # a hard crash: no cleanup, no exception, as a killed worker
        raise InjectedFaultError(f"injected fault at step {step} on rank {self.rank}")

    def save_checkpoint(self, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="dcgan_ckpt_") as directory:
            checkpoints.save_state(state, directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def log_rows(self, rows: list[dict[str, float]]) -> None:
        tracking.log_metric_rows(self.tracking_uri, self.run_id, rows)

    def publish_grid(self, epoch: int, step: int, images: torch.Tensor) -> None:
        from pipeline.grids import make_grid

        grid = make_grid(images, nrow=8)
        tracking.log_image(self.tracking_uri, self.run_id, grid, GRID_KEY, step)


def _train_worker(plan: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: resume if there is a checkpoint, then train."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg: Config = from_dict(Config, plan["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    device = ray.train.torch.get_device()
    steps_per_epoch: int = plan["steps_per_epoch"]

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = checkpoints.load_state(directory)

    hooks = RayHooks(rank, world_size, plan)
    loop = TrainLoop(cfg, LoopEnv(rank, world_size, device, steps_per_epoch), hooks, state)
    urls: list[str] = plan["urls"]

    batches = data.EpochLoader(
        urls,
        batch_size=cfg.train.batch_size,
        rank=rank,
        world_size=world_size,
        num_batches=steps_per_epoch,
        seed=cfg.train.seed,
        loader_workers=cfg.train.loader_workers,
        pin_memory=device.type == "cuda",
    )
    outcome = loop.run(batches).to_dict()
    outcome["worker_node_ids"] = _gather_node_ids(world_size, device)
    return outcome


def _gather_node_ids(world_size: int, device: torch.device) -> list[str]:
    """Every rank's Ray node id, in rank order: where the workers ran (a collective call)."""
    import ray
    import torch.distributed as dist

    node_id = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node_id]
    # Node ids are fixed-length hex: gathered as bytes (no pickling, works on gloo and NCCL).
    local = torch.tensor(list(bytes.fromhex(node_id)), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [bytes(t.cpu().tolist()).hex() for t in gathered]


# --- driver side: preflight -----------------------------------------------------------------------


def storage_path(cfg: Config, root: Path) -> str:
    """Absolute Ray storage path: `train.storage_path`, '' = <root>/.ray_storage; URLs as is."""
    configured = cfg.train.storage_path
    if "://" in configured:
        return configured
    path = Path(configured) if configured else root / paths.RAY_STORAGE_DIR
    return str((root / path).resolve() if not path.is_absolute() else path)


def connect_ray() -> Any:
    """Connect to the cluster of `RAY_ADDRESS` or of `ray job submit`; else start Ray here."""
    import ray

    if not ray.is_initialized():
        external = os.environ.get("RAY_ADDRESS") or os.environ.get(_JOB_ENV)
        # ray.init() reads RAY_ADDRESS itself; without it, it starts a local cluster (with its
        # dashboard: Ray Train's placement-group cleaner polls the state API it serves).
        ray.init(address="auto" if external and not os.environ.get("RAY_ADDRESS") else None)
    return ray


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """UserError unless the cluster has the CPUs (and GPUs) that the workers reserve."""
    train = cfg.train
    need_cpus = train.num_workers * train.cpus_per_worker
    if available.get("CPU", 0) < need_cpus:
        raise UserError(
            f"Ray has {available.get('CPU', 0):g} CPUs, train needs {need_cpus} "
            f"(train.num_workers={train.num_workers} x train.cpus_per_worker="
            f"{train.cpus_per_worker}); lower them or add nodes"
        )
    if train.use_gpu and available.get("GPU", 0) < train.num_workers:
        raise UserError(
            f"Ray has {available.get('GPU', 0):g} GPUs, train.use_gpu needs one per worker "
            f"({train.num_workers}); set train.use_gpu=false or add GPUs"
        )


def check_stats(cfg: Config, stats: dict[str, Any]) -> int:
    """The number of train samples; UserError if the shards do not match the model's shape."""
    if (stats["image_size"], stats["channels"]) != (cfg.data.image_size, cfg.data.channels):
        raise UserError(
            f"shards hold {stats['image_size']}px images with {stats['channels']} channel(s), "
            f"params ask for {cfg.data.image_size}px/{cfg.data.channels}: rerun prepare"
        )
    return int(stats["splits"]["train"]["samples"])


@dataclass(frozen=True)
class TrainPlan:
    """Everything preflight established; what the workers receive (plain data)."""

    urls: list[str]
    steps_per_epoch: int
    tracking_uri: str
    storage_path: str
    fault: FaultSpec | None


def preflight(cfg: Config, root: Path, stats_path: Path) -> TrainPlan:
    """Every check that needs no worker, cheapest first; each failure one UserError line."""
    train = cfg.train
    urls = data.shard_urls("train", train.shards or str(root / paths.SHARDS_DIR))
    data.check_plan(urls, train.num_workers, train.loader_workers)
    samples = check_stats(cfg, data.read_stats(stats_path))
    steps_per_epoch = data.steps_per_epoch(samples, train.batch_size, train.num_workers)
    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow, root)
    tracking.check_reachable(tracking_uri)
    fault_text = os.environ.get(FAULT_ENV, "")
    fault = FaultSpec.parse(fault_text) if fault_text else None
    check_resources(cfg, connect_ray().cluster_resources())
    return TrainPlan(urls, steps_per_epoch, tracking_uri, storage_path(cfg, root), fault)


# --- driver side: run and outputs -----------------------------------------------------------------


def _fit(cfg: Config, plan: TrainPlan, run_name: str, run_id: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    worker_plan = {
        "config": asdict(cfg),
        "urls": plan.urls,
        "steps_per_epoch": plan.steps_per_epoch,
        "tracking_uri": plan.tracking_uri,
        "mlflow_run_id": run_id,
        "fault": asdict(plan.fault) if plan.fault else None,
        "fault_marker": str(Path(plan.storage_path) / run_name / "fault_injected"),
    }
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=worker_plan,
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
    return trainer.fit()


def write_outputs(state: dict[str, Any], root: Path) -> dict[str, Any]:
    """Stage outputs from a final checkpoint: generator weights + spec, log CSV, grids."""
    weights = root / paths.GENERATOR_WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state["generator"], weights)
    spec = {
        "spec": state["spec"],
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "sha256": sha256_file(weights),
    }
    write_json(root / paths.GENERATOR_SPEC, spec)

    log_path = root / paths.TRAIN_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in LOG_COLUMNS} for row in state["log_rows"])

    grids_dir = root / paths.TRAIN_GRIDS_DIR
    for old in grids_dir.glob("epoch_*.png"):
        old.unlink()  # a shorter rerun must not leave grids of epochs it never had
    for epoch, pixels in enumerate(state["grids"], start=1):
        save_grid(pixels.float() / 127.5 - 1.0, grids_dir / f"epoch_{epoch:03d}.png", nrow=8)
    return spec


def train(cfg: Config, root: str | Path = ".", stats_path: str | Path | None = None) -> dict:
    """The train stage: preflight, Ray Train run, outputs; returns the train_run record."""
    root = Path(root).resolve()
    plan = preflight(cfg, root, Path(stats_path) if stats_path else root / paths.STATS)
    run_id, experiment_id = tracking.start_run(
        plan.tracking_uri, cfg.mlflow.experiment, to_flat_dict(cfg),
        tags={"stage": "train", "world_size": str(cfg.train.num_workers)},
    )
    run_name = f"dcgan-{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}"
    tracking.set_tags(plan.tracking_uri, run_id, {"ray_run_name": run_name})
    logger.info(
        "training %d epochs x %d steps on %d worker(s); MLflow run %s; Ray run %s",
        cfg.train.epochs, plan.steps_per_epoch, cfg.train.num_workers, run_id, run_name,
    )
    started = time.perf_counter()
    try:
        result = _run_to_end(cfg, plan, run_name, run_id)
    except BaseException:
        tracking.end_run(plan.tracking_uri, run_id, "FAILED")
        raise
    state, outcome, final_checkpoint = result
    spec = write_outputs(state, root)
    elapsed_s = time.perf_counter() - started
    rows = state["log_rows"]
    record = {
        "mlflow_run_id": run_id,
        "mlflow_experiment_id": experiment_id,
        "tracking_uri": plan.tracking_uri,
        "ray_run_name": run_name,
        "ray_storage_path": plan.storage_path,
        "final_checkpoint": final_checkpoint,
        "steps": state["step"],
        "epochs": cfg.train.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "images_seen": state["images_seen"],
        "world_size": cfg.train.num_workers,
        "worker_node_ids": outcome.get("worker_node_ids", []),
        "resumed_from_steps": outcome["resumed_from_steps"],
        "params_identical_across_ranks": len(set(outcome["param_sha256_by_rank"])) == 1,
        "generator_sha256": spec["sha256"],
        "final_loss_d": rows[-1]["loss_d"] if rows else None,
        "final_loss_g": rows[-1]["loss_g"] if rows else None,
        "mean_images_per_s": sum(r["images_per_s"] for r in rows) / len(rows) if rows else None,
        "wall_s": round(elapsed_s, 1),
    }
    record_path = write_json(root / paths.TRAIN_RUN, record)
    tracking.log_artifact(plan.tracking_uri, run_id, record_path)
    # Under `ray job submit` the local outputs vanish with the job; the run keeps the generator
    # at the same relative paths, so `mlflow artifacts download -a models -d .` restores them.
    for output in (paths.GENERATOR_WEIGHTS, paths.GENERATOR_SPEC):
        tracking.log_artifact(plan.tracking_uri, run_id, root / output, str(output.parent))
    tracking.end_run(plan.tracking_uri, run_id, "FINISHED")
    logger.info("trained %d steps in %.0f s; generator: %s; MLflow run %s", state["step"],
                elapsed_s, root / paths.GENERATOR_WEIGHTS, run_id)
    return record


def _root_cause(err: BaseException) -> str:
    """The most telling line of a worker-group error: the first `SomethingError: ...` line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (causes or lines or [type(err).__name__])[0]


def _run_to_end(
    cfg: Config, plan: TrainPlan, run_name: str, run_id: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Fit; return (final checkpoint state, rank 0's loop result, its path) or raise UserError."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    try:
        result = _fit(cfg, plan, run_name, run_id)
    except TrainingFailedError as err:
        raise UserError(
            f"training failed after {cfg.train.max_failures} restart(s): {_root_cause(err)} "
            f"(checkpoints: {plan.storage_path}/{run_name})"
        ) from err
    outcome = result.return_value or {}
    if outcome.get("nonfinite_step") is not None:
        last = result.checkpoint.path if result.checkpoint else "none"
        raise UserError(
            f"loss became NaN/inf at step {outcome['nonfinite_step']}: training stopped; "
            f"last good checkpoint: {last} (try lower train.lr_d/train.lr_g)"
        )
    if result.checkpoint is None:
        raise UserError(f"training ended without a checkpoint ({plan.storage_path}/{run_name})")
    with result.checkpoint.as_directory() as directory:
        state = checkpoints.load_state(directory)
    return state, outcome, result.checkpoint.path

