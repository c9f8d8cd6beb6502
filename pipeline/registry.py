"""MLflow model registry: register the evaluated generator, move aliases (promote, rollback).

Format of a registered generator
--------------------------------
An MLflow 3 *models from code* pyfunc: the model's code is the file
`pipeline/generator_pyfunc.py` (logged as source, never cloudpickled), plus two plain artifacts,
`spec` (JSON: nz, ngf, image_size, channels) and `weights` (the plain Generator state_dict,
read with `torch.load(weights_only=True)`). The modules it imports (`pipeline/models.py`) travel
with it as `code_paths`. Loading it therefore runs only this project's source and never
unpickles an object from the artifact store. It is logged into the *training* MLflow run (so
run and version link both ways) and carries a signature:

    inputs:  z       float32 [-1, nz]
    outputs: images  float32 [-1, C, H, W], in [-1, 1]

and an input example. Load it with `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and call
`.predict({"z": z})`.

Version tags (what `promote` compares and what the MLflow UI shows)
-------------------------------------------------------------------
`weights_sha256`; `metric.<name>` for every numeric evaluation metric; `feature_extractor`,
`feature_extractor_sha256`, `num_samples` (N); `dataset_sha256`; `param.<section.key>` for every
parameter; `git_commit` (when the working tree is a git checkout); `mlflow_run_id` (training
run), `ray_run_name`.

Aliases, not stages (deprecated): `register` sets `register.alias` (default `candidate`);
`promote` moves `champion` only when the version beats the holder on the same metric computed
with the same extractor and N, and records each decision as the JSON tag `<alias>.decision` on
the version and `<alias>.last_decision` on the registered model.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline import paths
from pipeline.cli import UserError
from pipeline.config import Config, to_flat_dict
from pipeline.files import sha256_file, write_json
from pipeline.tracking import check_reachable, read_train_run

if TYPE_CHECKING:  # pipeline.models imports torch, which promote does not need
    from pipeline.models import GeneratorSpec

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("generator_pyfunc.py")
# The modules the model code imports; shipped with the model so it loads outside this repo.
MODEL_CODE_DEPS = ("__init__.py", "models.py")
MODEL_ARTIFACT_NAME = "generator"
INPUT_EXAMPLE_ROWS = 2

TAG_WEIGHTS_SHA = "weights_sha256"
TAG_EXTRACTOR = "feature_extractor"
TAG_EXTRACTOR_SHA = "feature_extractor_sha256"
TAG_NUM_SAMPLES = "num_samples"
METRIC_TAG_PREFIX = "metric."
# Version tag -> the metrics.json keys that may hold it (evaluate writes `extractor`, ...).
EVALUATION_IDENTITY_KEYS = {
    TAG_EXTRACTOR: ("feature_extractor", "extractor"),
    TAG_EXTRACTOR_SHA: ("feature_extractor_sha256", "extractor_sha256"),
    TAG_NUM_SAMPLES: ("num_samples",),
}
# Tags that must be equal for two versions' metrics to be comparable, and how to name them.
COMPARABILITY_TAGS = (
    (TAG_EXTRACTOR_SHA, "feature extractor"),
    (TAG_NUM_SAMPLES, "N"),
    (METRIC_TAG_PREFIX + "num_real_samples", "number of real images"),
    ("dataset_sha256", "dataset"),
)
# Tried in order when `promote` is not given --metric: standard FID first, then the domain one.
DEFAULT_PROMOTE_METRICS = ("fid_inception", "fid_classifier")
LOWER_IS_BETTER_PREFIXES = ("fid", "kid")


@dataclass(frozen=True)
class Registration:
    """What `register_generator` did: the version (new or existing) and its alias."""

    name: str
    version: str
    uri: str
    alias: str
    created: bool

    def __str__(self) -> str:
        how = "new version" if self.created else "these weights were already registered"
        return f"{self.name} version {self.version} ({how}) holds alias {self.alias!r}: {self.uri}"


@dataclass(frozen=True)
class Decision:
    """One promote decision, as recorded in the registry's tags."""

    name: str
    alias: str
    version: str
    previous_version: str | None
    metric: str
    value: float | None
    previous_value: float | None
    promoted: bool
    forced: bool
    reason: str
    time: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# --- connecting ---------------------------------------------------------------------------------


def open_registry(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri` (also made the process default, which `models:/` URIs use).

    Raises UserError before any work when an http(s) server does not answer.
    """
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _read_json(path: Path, produced_by: str) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} not found: run the {produced_by} stage first")
    return json.loads(path.read_text())


def git_commit(cwd: Path | None = None) -> str | None:
    """The checked-out commit, or None outside a git checkout (e.g. a Ray cluster image)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


# --- tags ---------------------------------------------------------------------------------------


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def evaluation_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Version tags from reports/metrics.json: numbers as `metric.<name>`, the extractor's name
    and hash and N under their own keys, any other entry as `eval.<name>`."""
    flat = _flatten(metrics)
    identity_keys = {key for keys in EVALUATION_IDENTITY_KEYS.values() for key in keys}
    tags: dict[str, str] = {}
    for tag, keys in EVALUATION_IDENTITY_KEYS.items():
        found = next((flat[key] for key in keys if flat.get(key) is not None), None)
        if found is not None:
            tags[tag] = str(found)
    for key, value in flat.items():
        if _is_number(value):
            tags[METRIC_TAG_PREFIX + key] = repr(float(value))
        elif key not in identity_keys:
            # Booleans, nulls, lists as JSON; strings such as a skipped-FID reason as they are.
            tags[f"eval.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return tags


def version_tags(
    cfg: Config,
    *,
    weights_sha256: str,
    metrics: Mapping[str, Any],
    train_run: Mapping[str, Any],
    stats: Mapping[str, Any],
) -> dict[str, str]:
    """Every tag a registered version carries (module docstring lists them)."""
    tags = {TAG_WEIGHTS_SHA: weights_sha256, **evaluation_tags(metrics)}
    tags.update({f"param.{key}": str(value) for key, value in to_flat_dict(cfg).items()})
    tags["dataset_sha256"] = str(stats.get("dataset_sha256", "unknown"))
    tags["mlflow_run_id"] = str(train_run["mlflow_run_id"])
    tags["ray_run_name"] = str(train_run.get("ray_run_name", ""))
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


# --- register -----------------------------------------------------------------------------------


def generator_signature(spec: GeneratorSpec) -> ModelSignature:
    """z float32 [-1, nz] -> images float32 [-1, C, H, W]."""
    image_shape = (-1, spec.channels, spec.image_size, spec.image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.nz), "z")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), image_shape, "images")]),
    )


def find_version_by_weights(
    client: MlflowClient, name: str, weights_sha256: str
) -> ModelVersion | None:
    """The version of `name` registered for these weights, if any (oldest first)."""
    versions = client.search_model_versions(
        f"name = '{name}' and tags.{TAG_WEIGHTS_SHA} = '{weights_sha256}'"
    )
    return min(versions, key=lambda v: int(v.version), default=None)


def _code_package(directory: Path) -> Path:
    """Copy the modules the model code imports into `directory/pipeline` (its code_paths)."""
    package = directory / "pipeline"
    package.mkdir()
    for module in MODEL_CODE_DEPS:
        shutil.copy2(MODEL_CODE.with_name(module), package / module)
    return package


def log_generator_model(
    spec: GeneratorSpec, weights_path: Path, run_id: str
) -> mlflow.models.model.ModelInfo:
    """Log the generator (format: module docstring) into the existing run `run_id`."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict(), sort_keys=True))
        example = {"z": np.zeros((INPUT_EXAMPLE_ROWS, spec.nz), dtype=np.float32)}
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(MODEL_CODE),
                artifacts={"spec": str(spec_path), "weights": str(weights_path)},
                code_paths=[str(_code_package(Path(tmp)))],
                signature=generator_signature(spec),
                input_example=example,
                # Explicit requirements: inferring them would import the model in a subprocess.
                pip_requirements=[
                    f"mlflow=={mlflow.__version__}",
                    f"torch=={package_version('torch').split('+')[0]}",
                    f"numpy=={np.__version__}",
                ],
            )


def _check_training_run(
    client: MlflowClient, train_run: Mapping[str, Any], tracking_uri: str
) -> str:
    run_id = str(train_run.get("mlflow_run_id") or "")
    if not run_id:
        raise UserError(f"{paths.TRAIN_RUN} has no mlflow_run_id: rerun the train stage")
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise UserError(
            f"training run {run_id} is not in the tracking store {tracking_uri} (train logged it "
            f"to {train_run.get('tracking_uri', '?')}); set mlflow.tracking_uri to that store"
        ) from err
    return run_id


def register_generator(
    cfg: Config,
    tracking_uri: str,
    *,
    weights_path: Path = paths.GENERATOR_WEIGHTS,
    spec_path: Path = paths.GENERATOR_SPEC,
    metrics_path: Path = paths.EVAL_METRICS,
    train_run_path: Path = paths.TRAIN_RUN,
    stats_path: Path = paths.STATS,
    record_path: Path = paths.REGISTRY_RECORD,
) -> Registration:
    """Register the evaluated generator as `register.model_name`, alias `register.alias`.

    Idempotent: a version that already holds these weights (by SHA-256) is reused, its tags
    refreshed. Writes `record_path` ({name, version, uri, alias}).
    """
    from pipeline.models import GeneratorSpec  # torch: not needed by promote, so imported here

    name, alias = cfg.register.model_name, cfg.register.alias
    if not weights_path.exists():
        raise UserError(f"{weights_path} not found: run the train stage first")
    generator_info = _read_json(spec_path, "train")
    metrics = _read_json(metrics_path, "evaluate")
    train_run = read_train_run(train_run_path)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    spec = GeneratorSpec.from_dict(generator_info["spec"])
    weights_sha256 = sha256_file(weights_path)
    recorded_sha = generator_info.get("sha256")
    if recorded_sha and recorded_sha != weights_sha256:
        raise UserError(
            f"{weights_path} does not match the sha256 in {spec_path}: rerun train and evaluate"
        )

    client = open_registry(tracking_uri)
    run_id = _check_training_run(client, train_run, tracking_uri)
    tags = version_tags(
        cfg, weights_sha256=weights_sha256, metrics=metrics, train_run=train_run, stats=stats
    )
    existing = find_version_by_weights(client, name, weights_sha256)
    if existing is None:
        log.info("logging the generator into training run %s", run_id)
        info = log_generator_model(spec, weights_path, run_id)
        # Tags at creation: a crash cannot leave a version without its weights hash.
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
        created = True
    else:
        version = existing.version
        log.info("weights already registered as %s version %s; refreshing tags", name, version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        created = False
    client.set_registered_model_alias(name, alias, version)
    registration = Registration(name, str(version), f"models:/{name}/{version}", alias, created)
    record = {k: v for k, v in asdict(registration).items() if k != "created"}
    write_json(record_path, record, sort_keys=True)
    log.info("%s version %s holds alias %r", name, version, alias)
    return registration


# --- promote ------------------------------------------------------------------------------------


def lower_is_better(metric: str) -> bool:
    """FID and KID are distances (lower is better); scores and coverage are higher-is-better."""
    return metric.startswith(LOWER_IS_BETTER_PREFIXES)


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        # SQL stores answer INVALID_PARAMETER_VALUE "alias ... not found"; REST may differ.
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in err.message:
            return None
        raise


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise UserError(f"model {name!r} has no version {version}") from err


def _metric_value(version: ModelVersion, metric: str) -> float | None:
    raw = version.tags.get(METRIC_TAG_PREFIX + metric)
    return None if raw is None else float(raw)


def choose_metric(version: ModelVersion, metric: str | None) -> str:
    """`metric` if given, else the first of DEFAULT_PROMOTE_METRICS the version carries."""
    available = sorted(
        k[len(METRIC_TAG_PREFIX) :] for k in version.tags if k.startswith(METRIC_TAG_PREFIX)
    )
    if metric is None:
        metric = next((m for m in DEFAULT_PROMOTE_METRICS if m in available), None)
        if metric is None:
            raise UserError(
                f"version {version.version} has none of {', '.join(DEFAULT_PROMOTE_METRICS)}; "
                f"pass --metric (available: {', '.join(available) or 'none'})"
            )
    elif metric not in available:
        raise UserError(
            f"version {version.version} has no metric {metric!r} "
            f"(available: {', '.join(available) or 'none'})"
        )
    return metric


def _refusal(candidate: ModelVersion, holder: ModelVersion, alias: str, metric: str) -> str | None:
    """Why `candidate` may not take `alias` from `holder` on `metric`, or None if it beats it."""
    for key, label in COMPARABILITY_TAGS:
        mine, theirs = candidate.tags.get(key), holder.tags.get(key)
        if mine != theirs:
            return (
                f"version {candidate.version} and {alias} version {holder.version} were evaluated "
                f"with a different {label} ({mine} vs {theirs}): {metric} values are not comparable"
            )
    value, previous = _metric_value(candidate, metric), _metric_value(holder, metric)
    if previous is None:
        return f"{alias} version {holder.version} has no {metric} to compare with"
    better = value < previous if lower_is_better(metric) else value > previous
    if not better:
        direction = "lower" if lower_is_better(metric) else "higher"
        return (
            f"version {candidate.version} ({metric}={value:.6g}) does not beat {alias} version "
            f"{holder.version} ({metric}={previous:.6g}; {direction} is better)"
        )
    return None


def _default_version(client: MlflowClient, name: str, source_alias: str) -> ModelVersion:
    holder = alias_holder(client, name, source_alias)
    if holder is not None:
        return holder
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise UserError(f"registered model {name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


def _record(client: MlflowClient, decision: Decision) -> None:
    client.set_model_version_tag(
        decision.name, decision.version, f"{decision.alias}.decision", decision.to_json()
    )
    client.set_registered_model_tag(
        decision.name, f"{decision.alias}.last_decision", decision.to_json()
    )


def promote(
    client: MlflowClient,
    name: str,
    *,
    version: str | None = None,
    alias: str = "champion",
    metric: str | None = None,
    force: bool = False,
    source_alias: str = "candidate",
) -> Decision:
    """Move `alias` to `version` (default: the `source_alias` holder, else the newest version)
    if it beats the current holder on `metric` evaluated with the same extractor and N.

    A version older than the holder's is a rollback, under the same rule. `force` moves the
    alias regardless. Every decision is recorded as tags; a refusal raises UserError (one line).
    """
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        raise UserError(f"no registered model named {name!r}") from err
    candidate = (
        _get_version(client, name, version)
        if version
        else _default_version(client, name, source_alias)
    )
    metric = choose_metric(candidate, metric)
    value = _metric_value(candidate, metric)
    holder = alias_holder(client, name, alias)
    if holder is None:
        refusal, reason = None, f"no version held {alias!r}"
    elif holder.version == candidate.version:
        refusal, reason = None, f"version {candidate.version} already holds {alias!r}"
    else:
        refusal = _refusal(candidate, holder, alias, metric)
        reason = refusal or f"{metric} {value:.6g} beats {_metric_value(holder, metric):.6g}"
    if refusal and force:
        reason = f"forced: {refusal}"
    decision = Decision(
        name=name,
        alias=alias,
        version=str(candidate.version),
        previous_version=holder.version if holder else None,
        metric=metric,
        value=value,
        previous_value=_metric_value(holder, metric) if holder else None,
        promoted=refusal is None or force,
        forced=refusal is not None and force,
        reason=reason,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _record(client, decision)
    if not decision.promoted:
        raise UserError(f"not promoted: {reason}; pass --force to move {alias!r} anyway")
    client.set_registered_model_alias(name, alias, candidate.version)
    return decision
