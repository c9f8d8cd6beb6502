"""Every check of the train stage that needs no worker, cheapest first, and the typed plan the
workers receive. Each failure is one UserError line, before any worker starts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import tracking
from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import DatasetStats
from pipeline.data import loader
from pipeline.data.reader import shard_urls
from pipeline.train.faults import FaultSpec, fault_from_env


@dataclass(frozen=True)
class TrainPlan:
    """What preflight established on the driver."""

    urls: list[str]
    split_shape: tuple[int, int, int, int]  # (train samples, C, H, W)
    steps_per_epoch: int
    tracking_uri: str
    storage_path: str
    fault: FaultSpec | None


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


def preflight(cfg: Config, layout: Layout) -> TrainPlan:
    """Shards and their plan for the world size, the data's shape, the MLflow store, the
    fault spec. (The cluster's resources are checked by the Ray adapter, which connects.)"""
    train = cfg.train
    urls = shard_urls("train", layout.shards(train.shards))
    loader.check_plan(urls, train.num_workers, train.loader_workers)
    stats = DatasetStats.load(layout)
    stats.check_shape(cfg.data.image_size, cfg.data.channels, "train")
    samples = stats.split_samples("train")
    steps_per_epoch = loader.steps_per_epoch(samples, train.batch_size, train.num_workers)
    split_shape = (samples, stats.channels, stats.image_size, stats.image_size)
    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow, layout.root)
    tracking.check_reachable(tracking_uri)
    fault = fault_from_env(dict(os.environ))
    return TrainPlan(urls, split_shape, steps_per_epoch, tracking_uri, storage_path(cfg, layout),
                     fault)


def worker_plan(cfg: Config, plan: TrainPlan, run_name: str, run_id: str) -> WorkerPlan:
    """The plan every worker of run `run_name` receives."""
    marker = Path(plan.storage_path) / run_name / "fault_injected"
    return WorkerPlan(cfg, plan.urls, plan.split_shape, plan.steps_per_epoch, plan.tracking_uri,
                      run_id, plan.fault, str(marker))
