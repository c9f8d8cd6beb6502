"""`python -m pipeline import-run`: a train run's outputs, from its MLflow run into the
workspace and into DVC's lock, so that `dvc repro` goes on with evaluate and register without
training again.

A job started by `ray job submit` writes its outputs into the job's copy of the repository,
which vanishes with the job; the train stage also logs them to its MLflow run
(`tracking.TRAIN_RUN_ARTIFACTS`). Importing one:

1. finds the run (by id, or by the submission id of the job that ran it): a FINISHED run of
   the train stage;
2. downloads its outputs to a staging folder and checks them: the generator against the
   SHA-256 in its record and in the run's train_run.json, the data it trained on against
   `data/stats.json` here;
3. makes params.yaml say what the run trained with: every parameter of the train stage that
   DVC records (dvc.yaml), except `train.shards` and `train.storage_path` (where the cluster
   found the data and kept checkpoints: the data itself is checked by its hash), so that the
   lock tells the truth;
4. moves the files into place and records them with `dvc commit --force train`.

Nothing in the workspace changes before every check has passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import tracking
from pipeline.core.config import (
    PARAMS_FILE,
    from_logged_text,
    load_config,
    set_params,
    to_flat_dict,
)
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.layout import Layout
from pipeline.core.records import DatasetStats, GeneratorRecord, TrainRun

TRAIN_STAGE = "train"
# Where the cluster read shards and kept checkpoints: true of the cluster, not of this
# workspace, and not what the generator is (the data is checked by its hash instead).
LOCATION_KEYS = frozenset({"train.shards", "train.storage_path"})
# Keys of the data the run trained on: they belong to `prepare`, so they must already match.
DATA_PREFIX = "data."


@dataclass(frozen=True)
class ImportResult:
    """What `import_run` did, for the command to print."""

    run_id: str
    train_run: TrainRun
    files: list[Path]
    params_changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (was, now)
    params_kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (here, run's)
    dvc_committed: bool = False


# --- finding the run ----------------------------------------------------------------------------


def check_store(tracking_uri: str) -> None:
    """UserError when a SQLite store does not exist: opening it would create an empty one and
    report the run as missing from it."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise UserError(
                f"no MLflow store at {path}: pass --tracking-uri, the server the job logged "
                "to (its mlflow.tracking_uri)"
            )


def find_run(client: Any, tracking_uri: str, run_id: str | None, job: str | None) -> Any:
    """The finished train run with `run_id`, or the one the job `job` ran; UserError else."""
    from mlflow.exceptions import MlflowException

    if job:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.{tracking.JOB_TAG} = '{job}'")
        if len(runs) != 1:
            ids = ", ".join(r.info.run_id for r in runs)
            found = f"{len(runs)} runs ({ids})" if runs else "no run"
            raise UserError(f"{found} of job {job!r} in {tracking_uri}: pass the run id (the "
                            "job's last log line names it), or the server the job logged to")
        run = runs[0]
    else:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UserError(
                f"run {run_id} is not in the tracking store {tracking_uri}: pass --tracking-uri, "
                "the server the job logged to (its mlflow.tracking_uri)"
            ) from None
    if run.data.tags.get(tracking.TAG_STAGE) != TRAIN_STAGE:
        raise UserError(f"run {run.info.run_id} is not a run of the train stage")
    if run.info.status != "FINISHED":
        raise UserError(f"run {run.info.run_id} is {run.info.status}, not FINISHED: only a "
                        "training that finished can be imported (`ray job status` says why)")
    return run


# --- download and checks ------------------------------------------------------------------------


def download(client: Any, run_id: str, staging: Path) -> Layout:
    """The run's outputs under `staging`, at their repository paths; UserError when one is
    missing (a run of an older train stage, or a damaged store)."""
    from mlflow.exceptions import MlflowException

    for artifact, relative in tracking.TRAIN_RUN_ARTIFACTS.items():
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging) as scratch:
            try:
                fetched = Path(client.download_artifacts(run_id, artifact, scratch))
            except (MlflowException, OSError):
                fetched = None
            if fetched is None or not fetched.exists() or (
                fetched.is_dir() and not any(fetched.iterdir())
            ):
                raise UserError(
                    f"run {run_id} has no artifact {artifact}: a train stage older than "
                    "import-run logged it; train again (`mlflow artifacts download` still "
                    "fetches its models/)"
                )
            shutil.move(fetched, target)
    return Layout(staging)


def verify(staged: Layout, run_id: str) -> TrainRun:
    """The staged train_run record, after checking the generator against both hashes."""
    train_run = TrainRun.load(staged)
    generator = GeneratorRecord.load(staged)
    for name, check in (("generator.pt", generator.verified_weights),
                        ("generator_raw.pt", generator.verified_raw_weights)):
        try:
            check(staged)
        except UserError:
            raise UserError(f"run {run_id}: models/{name} does not match the SHA-256 in its "
                            "models/generator.json (a damaged upload?); nothing was imported"
                            ) from None
    if train_run.mlflow_run_id != run_id or train_run.generator_sha256 != generator.sha256:
        raise UserError(f"run {run_id}: its train_run.json names run {train_run.mlflow_run_id} "
                        f"and generator {train_run.generator_sha256[:12]}, not this run's "
                        f"generator {generator.sha256[:12]}; nothing was imported")
    return train_run


def check_dataset(layout: Layout, train_run: TrainRun) -> None:
    """UserError unless the run trained on the data that data/stats.json here describes."""
    stats = DatasetStats.load(layout)
    if train_run.dataset_sha256 and train_run.dataset_sha256 != stats.dataset_sha256:
        raise UserError(
            f"run {train_run.mlflow_run_id} trained on dataset {train_run.dataset_sha256[:12]}, "
            f"but {layout.stats} describes {stats.dataset_sha256[:12]}: prepare the same data "
            "here first (`dvc repro prepare`, same data.* params and images)"
        )


# --- params and DVC -----------------------------------------------------------------------------


def stage_param_keys(layout: Layout, stage: str, all_keys: list[str]) -> list[str]:
    """The dotted keys of params.yaml that dvc.yaml lists for `stage` (sections expanded)."""
    dvc_yaml = layout.path("dvc.yaml")
    if not dvc_yaml.exists():
        raise UserError(f"no dvc.yaml in {layout.root}: run this in the repository (or --params)")
    entries = yaml.safe_load(dvc_yaml.read_text())["stages"][stage].get("params", [])
    names = [entry for entry in entries if isinstance(entry, str)]  # params.yaml's own
    return [key for key in all_keys
            if any(key == name or key.startswith(name + ".") for name in names)]


def logged_params(client: Any, run: Any) -> dict[str, str]:
    """Every parameter the run trained with, as logged text: the run's params (a curated few,
    for the UI) completed by its full `config.yaml` artifact (as asked for, auto values 0)."""
    params = dict(run.data.params)
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    if tracking.CONFIG_ARTIFACT not in logged:  # a run from before the artifact existed
        return params
    with tempfile.TemporaryDirectory(prefix="import-run-config-") as folder:
        path = client.download_artifacts(run.info.run_id, tracking.CONFIG_ARTIFACT, folder)
        tree = yaml.safe_load(Path(path).read_text()) or {}
    for section, values in tree.items():
        for key, value in (values or {}).items():
            params[f"{section}.{key}"] = str(value)  # as MLflow logs a param
    return params


def param_changes(
    params_path: Path, run_params: dict[str, str], keys: list[str], run_id: str
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(keys to set: (value here, run's value), location keys kept: (here, run's)).
    UserError when the run lacks a key or trained on other data.* values."""
    here = to_flat_dict(load_config(params_path))
    changes, kept = {}, {}
    for key in keys:
        if key not in run_params:
            raise UserError(f"run {run_id} has no parameter {key}: not a run of this train stage")
        try:
            theirs = from_logged_text(key, run_params[key])
        except ConfigError as err:
            raise UserError(f"run {run_id}: {err}") from None
        if theirs == here[key]:
            continue
        if key.startswith(DATA_PREFIX):
            raise UserError(f"run {run_id} trained with {key}={theirs!r}, params.yaml has "
                            f"{here[key]!r}: prepare that data here first")
        (kept if key in LOCATION_KEYS else changes)[key] = (here[key], theirs)
    return changes, kept


def dvc_commit(root: Path, stage: str) -> None:
    """`dvc commit --force <stage>`: record the stage's outputs, deps and params in dvc.lock."""
    beside = Path(sys.executable).parent / "dvc"
    dvc = str(beside) if beside.exists() else shutil.which("dvc")
    if dvc is None:
        raise UserError("no `dvc` command: activate the venv, or pass --no-dvc-commit")
    result = subprocess.run([dvc, "commit", "--force", stage], cwd=root, capture_output=True,
                            text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode != 0:
        said = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise UserError(f"`dvc commit --force {stage}` failed: {said[-1] if said else '?'}")


# --- the whole import ---------------------------------------------------------------------------


def _install(staged: Layout, layout: Layout) -> list[Path]:
    """Move the staged outputs into the workspace (replacing what was there)."""
    installed = []
    for relative in tracking.TRAIN_RUN_ARTIFACTS.values():
        source, target = staged.path(relative), layout.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(source, target)
        installed.append(target)
    return installed


def import_run(
    layout: Layout,
    tracking_uri: str,
    run_id: str | None = None,
    job: str | None = None,
    commit: bool = True,
) -> ImportResult:
    """Import the train run `run_id` (or that of job `job`) into the workspace at `layout`:
    see the module docstring. Returns what was done; UserError (nothing changed) on failure."""
    from mlflow import MlflowClient

    check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    run = find_run(client, tracking_uri, run_id, job)
    run_id = run.info.run_id
    params_path = layout.path(PARAMS_FILE)
    keys = stage_param_keys(layout, TRAIN_STAGE, list(to_flat_dict(load_config(params_path))))
    changes, kept = param_changes(params_path, logged_params(client, run), keys, run_id)
    with tempfile.TemporaryDirectory(prefix=".import-run-", dir=layout.root) as staging:
        staged = download(client, run_id, Path(staging))
        train_run = verify(staged, run_id)
        check_dataset(layout, train_run)
        files = _install(staged, layout)
    # The record again, through its type: this also writes metrics/train.json.
    train_run.save(layout)
    if changes:
        set_params(params_path, {key: now for key, (_, now) in changes.items()})
    if commit:
        dvc_commit(layout.root, TRAIN_STAGE)
    return ImportResult(run_id, train_run, [*files, layout.metrics(TRAIN_STAGE)], changes, kept,
                        commit)
