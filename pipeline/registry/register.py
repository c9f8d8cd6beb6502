"""The `register` stage: the evaluated generator -> MLflow model registry, with its alias.

Aliases, not stages (deprecated): `register` sets `register.alias` (default `candidate`); moving
`champion` is `pipeline.registry.promote`'s job. Packaging: `pipeline.registry.package`; version
tags: `pipeline.registry.tags`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import (
    DatasetStats,
    Evaluation,
    GeneratorRecord,
    RegistryRecord,
    TrainRun,
)
from pipeline.core.tracking import TAG_DESCRIPTION, check_reachable, resolve_tracking_uri
from pipeline.models.dcgan import GeneratorSpec
from pipeline.registry.package import find_version_by_weights, log_generator_model
from pipeline.registry.tags import LEGACY_TAG_PREFIXES, version_tags

log = logging.getLogger(__name__)

TAG_ALIAS_WITHHELD = "alias_withheld"  # on a version that did not take the alias: why

MODEL_DESCRIPTION = (
    "DCGAN generator of the dcgan-pipeline. Each version is one trained and evaluated "
    "generator; its description and tags give its scores and lineage, its source run holds "
    "the parameters, training curves and sample grids. Alias `candidate`: the newest "
    "registration; `champion`: the promoted one (`python -m pipeline promote`). Load with "
    "mlflow.pyfunc.load_model('models:/<name>@champion').predict({'z': z})."
)


@dataclass(frozen=True)
class Registration:
    """What `register_generator` did: the version (new or existing) and its alias."""

    record: RegistryRecord
    created: bool

    @property
    def version(self) -> str:
        """The registered version that holds the alias."""
        return self.record.version

    def __str__(self) -> str:
        how = "new version" if self.created else "these weights were already registered"
        r = self.record
        if r.alias_withheld:
            return (f"{r.name} version {r.version} ({how}) registered for lineage, alias "
                    f"{r.alias!r} not moved: {r.alias_withheld}: {r.uri}")
        return f"{r.name} version {r.version} ({how}) holds alias {r.alias!r}: {r.uri}"


def withheld_reason(evaluation: Evaluation) -> str | None:
    """Why this evaluation is not worth the alias (a mode collapse, a non-finite FID), or None.
    Such a version is still registered, for lineage, but must not be what `promote` picks up."""
    fids = {key: value for key, value in evaluation.scores.items()
            if key.startswith("fid_") and not key.endswith(("_floor", "_std"))}
    broken = sorted(key for key, value in fids.items() if not math.isfinite(value))
    if broken:
        return f"non-finite {', '.join(broken)}"
    if evaluation.mode_collapse:
        return f"mode collapse ({evaluation.classes_hit_words()})"
    return None


def open_registry(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri` (also made the process default, which `models:/` URIs use).

    Raises UserError before any work when an http(s) server does not answer.
    """
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _training_run(client: MlflowClient, train_run: TrainRun, tracking_uri: str) -> Run:
    try:
        return client.get_run(train_run.mlflow_run_id)
    except MlflowException as err:
        raise UserError(
            f"training run {train_run.mlflow_run_id} is not in the tracking store "
            f"{tracking_uri} (train logged it to {train_run.tracking_uri}); set "
            "mlflow.tracking_uri to that store"
        ) from err


def _refresh_tags(client: MlflowClient, version: ModelVersion, tags: dict[str, str]) -> None:
    """Set `tags` on an existing version; drop what older releases tagged per parameter."""
    for key in version.tags:
        if key.startswith(LEGACY_TAG_PREFIXES):
            client.delete_model_version_tag(version.name, version.version, key)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)


def _describe_model(client: MlflowClient, name: str) -> None:
    """Give the registered model its description, unless someone already wrote one."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)


def run(cfg: Config, layout: Layout) -> Registration:
    """The `register` stage (`stages/register.py`): `register_generator` into the store of
    `mlflow.tracking_uri`."""
    return register_generator(cfg, layout, resolve_tracking_uri(cfg.mlflow, layout.root))


def register_generator(cfg: Config, layout: Layout, tracking_uri: str) -> Registration:
    """Register the evaluated generator as `register.model_name`, alias `register.alias`.

    Idempotent: a version that already holds these weights (by SHA-256) is reused, its tags
    refreshed. Writes reports/registry.json.
    """
    name, alias = cfg.register.model_name, cfg.register.alias
    generator = GeneratorRecord.load(layout)
    weights = generator.verified_weights(layout)
    evaluation = Evaluation.load(layout)
    train_run = TrainRun.load(layout)
    stats = DatasetStats.load(layout) if DatasetStats.exists(layout) else None
    spec = GeneratorSpec.from_dict(generator.spec)

    client = open_registry(tracking_uri)
    run = _training_run(client, train_run, tracking_uri)
    run_id = run.info.run_id
    tags = version_tags(weights_sha256=generator.sha256, evaluation=evaluation,
                        train_run=train_run, stats=stats, run_tags=run.data.tags,
                        root=layout.root)
    existing = find_version_by_weights(client, name, generator.sha256)
    if existing is None:
        log.info("logging the generator into training run %s", run_id)
        info = log_generator_model(spec, weights, run_id)
        # Tags at creation: a crash cannot leave a version without its weights hash.
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
        created = True
    else:
        version = str(existing.version)
        log.info("weights already registered as %s version %s; refreshing tags", name, version)
        _refresh_tags(client, existing, tags)
        created = False
    # The run's one-line description (evaluate wrote it) says what this version is.
    summary = run.data.tags.get(TAG_DESCRIPTION)
    if summary:
        client.update_model_version(name, version, description=summary)
    _describe_model(client, name)
    withheld = withheld_reason(evaluation)
    if withheld:
        client.set_model_version_tag(name, version, TAG_ALIAS_WITHHELD, withheld)
        log.warning("%s version %s is registered for lineage but does not take alias %r: %s",
                    name, version, alias, withheld)
    else:
        if TAG_ALIAS_WITHHELD in (existing.tags if existing else {}):
            client.delete_model_version_tag(name, version, TAG_ALIAS_WITHHELD)
        client.set_registered_model_alias(name, alias, version)
        log.info("%s version %s holds alias %r", name, version, alias)
    record = RegistryRecord(name=name, version=version, uri=f"models:/{name}/{version}",
                            alias=alias, alias_withheld=withheld)
    record.save(layout)
    return Registration(record, created)
