"""Every check of the train stage that needs no worker, cheapest first (the last one also
measures the real features that quality during training is compared with), the choice of workers
when `train.num_workers` / `train.cpus_per_worker` are 0 (auto), and the typed plan the workers
receive. Each failure is one UserError line, before any worker starts."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import tracking
from pipeline.core.config import Config, TrainConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import DatasetStats
from pipeline.data import loader
from pipeline.data.reader import shard_urls
from pipeline.metrics.probe import QualityReference, quality_reference
from pipeline.train.faults import FaultSpec, fault_from_env


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, in one typed value (Ray ships it to every worker)."""

    config: Config
    urls: list[str]
    split_shape: tuple[int, int, int, int]
    steps_per_epoch: int
    tracking_uri: str
    mlflow_run_id: str
    fault: FaultSpec | None
    fault_marker: str
    quality: QualityReference | None  # what rank 0 measures quality against, if anything
    spill_dir: str = ""  # where rank 0's tracking buffer keeps what the server did not take
    # What a resumed MLflow run already holds, per kind: the highest step (resume.RunChoice).
    logged_through: dict[str, int] = dataclasses.field(default_factory=dict)


def storage_path(cfg: Config, layout: Layout) -> str:
    """Absolute Ray storage: `train.storage_path` (URLs as they are; a relative path under the
    shared root, which outlives a DVC experiment's copy), '' = <shared root>/.ray_storage."""
    configured = cfg.train.storage_path
    if "://" in configured:
        return configured
    return str(layout.shared_path(configured) if configured else layout.ray_storage_dir)


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


@dataclass(frozen=True)
class Inputs:
    """What the cheap checks established, before Ray is asked for anything."""

    urls: list[str]
    split_shape: tuple[int, int, int, int]  # (train samples, C, H, W)
    tracking_uri: str
    storage_path: str
    fault: FaultSpec | None
    dataset_sha256: str  # of the shards data/stats.json describes: import-run checks it
    quality: QualityReference | None
    quality_reason: str  # what quality is measured while training, or why none


@dataclass(frozen=True)
class TrainPlan(Inputs):
    """What preflight established on the driver: the inputs, and the steps once the number
    of workers is known."""

    steps_per_epoch: int


def check_inputs(cfg: Config, layout: Layout) -> Inputs:
    """Shards, the data's shape, the MLflow store, the fault spec: all before Ray starts."""
    train = cfg.train
    urls = shard_urls("train", layout.shards(train.shards))
    loader.check_plan(urls, max(train.num_workers, 1), train.loader_workers)
    stats = DatasetStats.load(layout)
    stats.check_shape(cfg.data.image_size, cfg.data.channels, "train")
    split_shape = stats.split_shape("train")
    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow, layout.root)
    tracking.check_reachable(tracking_uri)
    fault = fault_from_env(dict(os.environ))
    quality, quality_reason = quality_reference(cfg, layout)
    return Inputs(urls, split_shape, tracking_uri, storage_path(cfg, layout), fault,
                  stats.dataset_sha256, quality, quality_reason)


def make_plan(cfg: Config, inputs: Inputs) -> TrainPlan:
    """The run's plan once the number of workers is known (`resolve_workers`)."""
    train = cfg.train
    loader.check_plan(inputs.urls, train.num_workers, train.loader_workers)
    steps_per_epoch = loader.steps_per_epoch(inputs.split_shape[0], train.batch_size,
                                             train.num_workers)
    return TrainPlan(**vars(inputs), steps_per_epoch=steps_per_epoch)


@dataclass(frozen=True)
class NodeResources:
    """What one alive Ray node offers."""

    cpus: float
    gpus: float


def resolve_workers(train: TrainConfig, nodes: list[NodeResources]) -> tuple[TrainConfig, str]:
    """`train` with `num_workers` and `cpus_per_worker` made explicit, and why.

    0 means auto. With GPUs: one worker per GPU, each with its node's CPUs shared among that
    node's GPUs. On CPUs: one worker per node, using all of the node's CPUs as torch threads:
    on a 2-core machine 1 x 2 trains at 0.98 of a plain loop, 2 x 1 under Ray at 0.82
    (BENCHMARKS.md, "CPU pace"). Explicit values are kept.
    """
    if train.num_workers and train.cpus_per_worker:
        return train, "as set in params"
    key = "GPU" if train.use_gpu else "CPU"
    usable = [n for n in nodes if (n.gpus if train.use_gpu else n.cpus) >= 1]
    if not usable:
        raise UserError(f"the Ray cluster has no node with a {key}: cannot choose workers "
                        "(set train.num_workers and train.cpus_per_worker)")
    workers = train.num_workers or (sum(int(n.gpus) for n in usable) if train.use_gpu
                                    else len(usable))
    per_node = math.ceil(workers / len(usable))
    if train.use_gpu:
        per_node = max(per_node, max(int(n.gpus) for n in usable))
    cpus = train.cpus_per_worker or max(1, min(int(n.cpus) for n in usable) // per_node)
    nodes_text = ", ".join(f"{n.cpus:g} CPUs/{n.gpus:g} GPUs" for n in usable)
    reason = f"auto, from {len(usable)} node(s) with {nodes_text}"
    return dataclasses.replace(train, num_workers=workers, cpus_per_worker=cpus), reason


UNLOGGED_DIR = "unlogged"  # in a Ray run's storage: what rank 0 could not log (sync-run)


def spill_dir(storage: str, run_name: str) -> Path:
    """Where the run's tracking buffer spills: under the run's storage (a URL storage: a local
    folder, named in the warning)."""
    if "://" in storage:
        import tempfile

        return Path(tempfile.gettempdir()) / "dcgan_unlogged" / run_name
    return Path(storage) / run_name / UNLOGGED_DIR


def worker_plan(cfg: Config, plan: TrainPlan, run_name: str, run_id: str,
                logged_through: dict[str, int] | None = None) -> WorkerPlan:
    """The plan every worker of run `run_name` receives."""
    marker = Path(plan.storage_path) / run_name / "fault_injected"
    return WorkerPlan(cfg, plan.urls, plan.split_shape, plan.steps_per_epoch, plan.tracking_uri,
                      run_id, plan.fault, str(marker), plan.quality,
                      str(spill_dir(plan.storage_path, run_name)), dict(logged_through or {}))
