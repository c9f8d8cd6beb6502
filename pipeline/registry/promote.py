"""Promotion: move an alias (`champion`) to a version only when it beats the holder on the same
metric, computed with the same feature extractor, N and dataset; rollbacks follow the same rule.
Every decision is recorded as the JSON tag `<alias>.decision` on the version (beside it
`<alias>.summary`, the same in one sentence) and `<alias>.last_decision` on the registered
model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.core.errors import UserError
from pipeline.registry.tags import COMPARABILITY_TAGS, METRIC_TAG_PREFIX, TAG_WEAK_CLASSIFIER

# Tried in order when `promote` is not given --metric: standard FID first, then the domain one.
DEFAULT_PROMOTE_METRICS = ("fid_inception", "fid_classifier")
LOWER_IS_BETTER_PREFIXES = ("fid", "kid")


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

    def summary(self) -> str:
        """The decision as a person reads it in the UI's tag list (the JSON beside it is for
        programs)."""
        verdict = ("forced to" if self.forced else "took") if self.promoted else "did not take"
        return f"version {self.version} {verdict} {self.alias!r}: {self.reason} ({self.time})"


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
    client.set_model_version_tag(
        decision.name, decision.version, f"{decision.alias}.summary", decision.summary()
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
    if metric.endswith("_classifier") and candidate.tags.get(TAG_WEAK_CLASSIFIER):
        reason += f" (measured with a WEAK classifier: {candidate.tags[TAG_WEAK_CLASSIFIER]})"
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
