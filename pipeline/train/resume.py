"""Which run a train stage continues: an interrupted one of the same config, data and code, or
a fresh one (README, "Interrupted training").

* Identity: SHA-256 of the keys that change what training produces (those dvc.yaml gives the
  train stage, less where things are stored, how often Ray retries and `train.resume`), the
  dataset's hash, the domain classifier's weights (quality while training) and the source of
  every module the train stage runs. It is the MLflow tag `train_identity` of every run.
* Ray run name: `dcgan-<identity[:12]>`, then `-2`, `-3` ... for later fresh runs of the same
  identity. Ray Train (V2) restores a run when a new `TorchTrainer` is started with the same
  `RunConfig(name, storage_path)` (Ray's fault-tolerance guide, "Job driver fault
  tolerance"): reusing the name is what makes it continue from the last checkpoint.
* Resumed: the identity's newest MLflow run, unless it FINISHED (or its storage says so) or
  it left no checkpoint. Its MLflow run goes back to RUNNING; rank 0 logs only what is newer
  than what the run already holds (`logged_through`), so the history is not duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import provenance, tracking
from pipeline.core.config import Config, to_flat_dict
from pipeline.core.layout import Layout
from pipeline.train.mlflow_run import TAG_RAY_RUN_NAME

logger = logging.getLogger(__name__)

TAG_IDENTITY = "train_identity"
STAGE_MODULE = "pipeline/train/train.py"  # what the train stage runs (stages/train.py calls it)
# Keys of the train stage's params that change nothing it produces.
NOT_IDENTITY = frozenset({"train.storage_path", "train.shards", "train.max_failures",
                          "train.resume"})
IDENTITY_SECTIONS = ("model.", "train.")
IDENTITY_KEYS = ("data.image_size", "data.channels", "eval.num_samples")
NAME_PREFIX = "dcgan-"
FINISHED_MARKER = "finished.json"  # in the Ray run's storage, written once outputs exist
PROGRESS_FILE = "progress.json"  # in every checkpoint directory: its step
RESUMABLE = ("RUNNING", "KILLED", "FAILED", "SCHEDULED")


def identity_digest(cfg: Config, dataset_sha256: str, classifier_sha256: str | None,
                    code_root: Path | None = None) -> str:
    """The hex identity of a training: config (resolved workers), data, classifier, code."""
    flat = to_flat_dict(cfg)
    keys = sorted(key for key in flat if (key.startswith(IDENTITY_SECTIONS) or
                                          key in IDENTITY_KEYS) and key not in NOT_IDENTITY)
    root = code_root or Path(__file__).resolve().parents[2]
    code = {path: hashlib.sha256((root / path).read_bytes()).hexdigest()
            for path in sorted(provenance.code_files(root, STAGE_MODULE) | {STAGE_MODULE})}
    material = {"config": {key: flat[key] for key in keys}, "dataset_sha256": dataset_sha256,
                "classifier_sha256": classifier_sha256, "code": code}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RunChoice:
    """The Ray run to start or continue and the MLflow run it logs to (None: create one)."""

    ray_run_name: str
    mlflow_run_id: str | None
    mlflow_experiment_id: str | None
    checkpoint_step: int | None  # the newest checkpoint's step on storage (None: fresh)
    reason: str
    # Per kind ("rows", "quality", "grids"): the highest step the MLflow run already holds.
    logged_through: dict[str, int] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        return self.mlflow_run_id is not None


def run_dir(storage_path: str, ray_run_name: str) -> Path:
    """The folder of a Ray run in local storage (URLs: see `_local`)."""
    return Path(storage_path) / ray_run_name


def _local(storage_path: str) -> bool:
    return "://" not in storage_path


def checkpoint_step(storage_path: str, ray_run_name: str) -> int | None:
    """The step of the newest checkpoint the run left on storage, None if none (or the storage
    is not a local path: then Ray alone knows)."""
    if not _local(storage_path):
        return None
    steps = []
    for progress in run_dir(storage_path, ray_run_name).glob(f"checkpoint_*/{PROGRESS_FILE}"):
        try:
            steps.append(int(json.loads(progress.read_text())["step"]))
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written when the driver died
    return max(steps, default=None)


def mark_finished(storage_path: str, ray_run_name: str, mlflow_run_id: str) -> None:
    """Record in the run's storage that its outputs were written: it is never resumed."""
    if _local(storage_path):
        folder = run_dir(storage_path, ray_run_name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FINISHED_MARKER).write_text(json.dumps({"mlflow_run_id": mlflow_run_id}) + "\n")


def _is_finished(storage_path: str, ray_run_name: str) -> bool:
    return _local(storage_path) and (run_dir(storage_path, ray_run_name) / FINISHED_MARKER).exists()


def fresh_name(identity: str, storage_path: str, taken: set[str]) -> str:
    """`dcgan-<identity[:12]>`, or with `-2`, `-3` ... when a run of that name exists (in
    MLflow or on storage): a later fresh run must not restore an earlier one's checkpoints."""
    base = NAME_PREFIX + identity[:12]
    number = 1
    while True:
        name = base if number == 1 else f"{base}-{number}"
        if name not in taken and not (_local(storage_path) and
                                      run_dir(storage_path, name).exists()):
            return name
        number += 1


def choose_run(cfg: Config, identity: str, storage_path: str, tracking_uri: str) -> RunChoice:
    """Continue the identity's interrupted run, or start a fresh one; says why."""
    runs = tracking.find_runs(tracking_uri, cfg.mlflow.experiment, {TAG_IDENTITY: identity})
    taken = {run.data.tags.get(TAG_RAY_RUN_NAME, "") for run in runs}

    def fresh(reason: str) -> RunChoice:
        return RunChoice(fresh_name(identity, storage_path, taken), None, None, None, reason)

    if cfg.train.resume == "never":
        return fresh("train.resume=never")
    if not runs:
        return fresh("no earlier run of this config, data and code")
    last = runs[0]
    run_id, name = last.info.run_id, last.data.tags.get(TAG_RAY_RUN_NAME, "")
    if last.info.status not in RESUMABLE or _is_finished(storage_path, name):
        return fresh(f"the last run of this config, data and code ({run_id}) finished")
    step = checkpoint_step(storage_path, name)
    if step is None and _local(storage_path):
        return fresh(f"the interrupted run {run_id} left no checkpoint in {storage_path}/{name}")
    logged = {
        "rows": tracking.last_logged_step(tracking_uri, run_id, tracking.TRAIN_PREFIX + "loss_d"),
        "quality": tracking.last_logged_step(tracking_uri, run_id,
                                             tracking.QUALITY_PREFIX + "fid_classifier"),
        "grids": tracking.last_image_step(tracking_uri, run_id, tracking.TRAIN_PREFIX + "samples"),
    }
    return RunChoice(name, run_id, last.info.experiment_id, step,
                     f"run {run_id} was {last.info.status}", logged)


def resume_line(choice: RunChoice, storage_path: str) -> str:
    """What the log says about the choice (which run, from which step, or why fresh)."""
    if not choice.resumed:
        return f"fresh Ray run {choice.ray_run_name} ({choice.reason})"
    where = (f"its checkpoint at step {choice.checkpoint_step}" if choice.checkpoint_step
             is not None else "its newest checkpoint")
    return (f"resuming Ray run {choice.ray_run_name} from {where} in {storage_path}; MLflow run "
            f"{choice.mlflow_run_id} continues ({choice.reason}, RUNNING again)")


def layout_classifier_sha(layout: Layout) -> str | None:
    """SHA-256 of the domain classifier's weights when there are any (quality while training)."""
    from pipeline.core.files import sha256_file

    weights = layout.classifier_weights
    return sha256_file(weights) if weights.exists() else None
