"""MLflow tracking: one run per training, written only by the driver and by rank 0.

The driver checks the tracking URI, creates the run with its name, tags and the parameters
that shape it; rank 0 adds the step metrics and the sample grids (images with their step, so
the UI's slider walks through training). Later stages reopen the run by the id that the train
stage writes to `reports/train_run.json`; evaluate adds its metrics and the description.

Names (README, "Comparing runs"): metric keys carry a section prefix, which the UI turns into a
group of charts: `train/` (losses, D outputs and the grids), `eval/` (every evaluation score),
`system/` (throughput, on the UI's System metrics tab), and one headline `fid` without prefix.
The step of every metric and image is the number of training images seen (global batch x
optimizer steps), so runs with different worker counts overlay at equal amounts of training.

The tracking URI: `mlflow.tracking_uri` in params.yaml; when that is '' the environment's
`MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`. A relative SQLite path is made absolute
against the workspace (Ray workers do not run in the repository root, and a DVC experiment's
temporary copy is deleted after the run: `pipeline.core.layout.workspace_root`).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.config import MlflowConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import workspace_root

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# What a train run keeps of the stage's outputs (artifact path -> path in the repository), so
# that a job's result outlives the job: `python -m pipeline import-run` brings them back.
# train_run.json stays at the root, where runs before the import kept it.
TRAIN_RUN_ARTIFACTS = {
    "train_run.json": Path("reports/train_run.json"),
    "models/generator.pt": Path("models/generator.pt"),
    "models/generator_raw.pt": Path("models/generator_raw.pt"),
    "models/generator.json": Path("models/generator.json"),
    "reports/train_log.csv": Path("reports/train_log.csv"),
    "reports/train_quality.csv": Path("reports/train_quality.csv"),
    "reports/train_grids": Path("reports/train_grids"),
}
JOB_TAG = "ray_job_submission_id"  # tag of a run that `ray job submit` ran

TRAIN_PREFIX = "train/"
EVAL_PREFIX = "eval/"
# The experiment tag by which MLflow 3's UI opens an experiment in its model-training view.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
QUALITY_PREFIX = "quality/"  # measured while training (pipeline.metrics.probe)
SYSTEM_PREFIX = "system/"
HEADLINE_FID = "fid"
TAG_DESCRIPTION = "mlflow.note.content"  # the UI shows it as the run's description
CONFIG_ARTIFACT = "config.yaml"  # a train run's full config (what it was asked to do)
TAG_STAGE = "stage"  # the DVC stage that made a run: import-run takes train runs only
_SQLITE = "sqlite:///"
_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(mlflow_cfg: MlflowConfig, root: Path) -> str:
    """The tracking URI to use: params, else $MLFLOW_TRACKING_URI, else the SQLite default;
    a relative `sqlite:///path` becomes absolute against the workspace of `root` (`root`
    itself, or the workspace of the DVC experiment copy that `root` is)."""
    uri = mlflow_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(_SQLITE):
        db_path = Path(uri[len(_SQLITE) :])
        if not db_path.is_absolute():
            uri = _SQLITE + str((workspace_root(Path(root)) / db_path).resolve())
    return uri


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """UserError (one line) if an http(s) tracking server does not answer, or the directory
    of a SQLite database does not exist. Cheap: call it before starting any worker."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):  # http(s) only: checked above
                return
        except urllib.error.HTTPError:
            return  # it answered: a server is there (a proxy may not serve /health)
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"MLflow tracking server {tracking_uri} is not reachable ({reason}); start it "
                "or set mlflow.tracking_uri"
            ) from None
    if tracking_uri.startswith(_SQLITE):
        parent = Path(tracking_uri[len(_SQLITE) :]).parent
        if not parent.is_dir():
            raise UserError(f"MLflow database directory {parent} does not exist ({tracking_uri})")


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (`<db dir>/mlruns`), not in
    whatever directory the first writer happened to run from; servers choose their own."""
    if not tracking_uri.startswith(_SQLITE):
        return None
    return (Path(tracking_uri[len(_SQLITE) :]).parent / "mlruns").resolve().as_uri()


# MLflow's HTTP client retries a refused connection 7 times with exponential backoff (minutes
# per call). Stages and commands bound it (seconds); rank 0's buffer does its own retrying.
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # sleeps 1 s, 2 s
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds per request
}


def bound_http_retries(overrides: Mapping[str, str] | None = None) -> None:
    """Bound MLflow's HTTP retries in this process (values a user exported are kept)."""
    for key, value in {**HTTP_RETRY_ENV, **(overrides or {})}.items():
        os.environ.setdefault(key, value)


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient  # imported late: a heavy import the workers mostly skip

    return MlflowClient(tracking_uri=tracking_uri)


def start_run(
    tracking_uri: str,
    experiment: str,
    params: Mapping[str, Any],
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Create a run in `experiment` (created if missing) holding `params`; return
    (run_id, experiment_id)."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(experiment, artifact_location=artifact_location(tracking_uri))
    )
    if found is None or TAG_EXPERIMENT_KIND not in found.tags:
        # MLflow 3's UI opens an experiment of no declared kind in its GenAI (traces) view.
        client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING_KIND)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=items[start : start + _PARAMS_PER_BATCH])
    return run.info.run_id, experiment_id


def find_runs(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> list[Any]:
    """The runs of `experiment` holding every tag of `tags`, newest first (none without the
    experiment)."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return list(client.search_runs([found.experiment_id], query,
                                   order_by=["attributes.start_time DESC"], max_results=50))


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed training continues it)."""
    _client(tracking_uri).update_run(run_id, status="RUNNING")


def last_logged_step(tracking_uri: str, run_id: str, key: str) -> int:
    """The highest step logged for metric `key` of a run (-1 if none)."""
    history = _client(tracking_uri).get_metric_history(run_id, key)
    return max((metric.step for metric in history), default=-1)


def last_image_step(tracking_uri: str, run_id: str, key: str) -> int:
    """The highest step of the images logged under `key` (`log_image`), -1 if none."""
    client = _client(tracking_uri)
    steps = [-1]
    for artifact in client.list_artifacts(run_id, "images"):
        # MLflow 3 names a step-indexed image `<key, / as ~>+step+<step>+timestamp+...`.
        name = Path(artifact.path).name
        if name.startswith(key.replace("/", "~") + "+step+"):
            steps.append(int(name.split("+step+")[1].split("+")[0]))
    return max(steps)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED (or FAILED / KILLED)."""
    _client(tracking_uri).set_terminated(run_id, status=status)


def log_metrics(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None
) -> None:
    """Log a dict of numbers to an existing run in one call (evaluate, register)."""
    log_metric_rows(tracking_uri, run_id, [{**metrics, "step": step or 0}])


def log_metric_rows(tracking_uri: str, run_id: str, rows: list[Mapping[str, float]]) -> None:
    """Log rows like {"step": 10, "loss_d": 0.7, ...}: every key but `step` as a metric at
    that step, batched (few calls however many rows)."""
    from mlflow.entities import Metric

    timestamp_ms = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), timestamp_ms, int(row["step"]))
        for row in rows
        for key, value in row.items()
        if key != "step"
    ]
    client = _client(tracking_uri)
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])


def log_image(tracking_uri: str, run_id: str, image: Any, key: str, step: int) -> None:
    """Log a PIL image as a step-indexed image (the UI shows a slider over steps)."""
    _client(tracking_uri).log_image(run_id, image, key=key, step=step)


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_dir: str = "") -> None:
    """Upload a file to the run's artifacts."""
    _client(tracking_uri).log_artifact(run_id, str(path), artifact_path=artifact_dir or None)


def log_artifacts(tracking_uri: str, run_id: str, folder: str | Path, artifact_dir: str) -> None:
    """Upload every file of `folder` to the run's `artifact_dir`."""
    _client(tracking_uri).log_artifacts(run_id, str(folder), artifact_path=artifact_dir)


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Write `text` as the run's artifact `artifact_file` (e.g. the full config)."""
    _client(tracking_uri).log_text(run_id, text, artifact_file)


def run_params_and_tags(tracking_uri: str, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """The parameters and the tags a run holds."""
    data = _client(tracking_uri).get_run(run_id).data
    return dict(data.params), dict(data.tags)


def set_description(tracking_uri: str, run_id: str, text: str) -> None:
    """The run's description (the UI shows it on the run page and as a column)."""
    set_tags(tracking_uri, run_id, {TAG_DESCRIPTION: text})


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set string tags on a run (one call)."""
    from mlflow.entities import RunTag

    if tags:
        _client(tracking_uri).log_batch(
            run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()]
        )
