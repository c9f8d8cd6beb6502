"""Joining Ray as the driver (of training, or of prepare's shard tasks): the cluster of
`RAY_ADDRESS`, the one of `ray job submit`, or a Ray started here (never a cluster that
happens to run on this machine unnamed).

Before `ray.init` joins the cluster of `RAY_ADDRESS`, one gRPC call to its head (the call
`ray.init` starts with) tells a wrong address or a missing or wrong token apart at once:
`ray.init` itself retries for ~20 s, printing `InvalidAuthToken` warnings, and then raises a
bare `ConnectionError`. Each failure becomes one UserError line saying what to set.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.core.errors import UserError

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for its entrypoint
PROBE_TIMEOUT_S = 10.0
ENV_HINT = "`source .ray_cluster/cluster.env` after `make cluster-up`"

# The dashboard of the cluster joined, as `ray.init` reported it (`ray job logs` needs it), and
# whether that Ray was started by this process.
_joined: dict[str, Any] = {}


def submission_id() -> str | None:
    """The submission id of the `ray job submit` job this process is the entrypoint of."""
    try:
        return json.loads(os.environ.get(JOB_ENV, ""))["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        return None


def started_here() -> bool:
    """Whether `connect_ray` started Ray in this process (no RAY_ADDRESS, no `ray job`)."""
    return bool(_joined.get("started_here"))


def job_logs_command() -> str | None:
    """`ray job logs <id> --address <dashboard>` for the job this process runs, else None."""
    job = submission_id()
    if job is None:
        return None
    dashboard = _joined.get("dashboard") or "<the dashboard you submitted to>"
    if "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    return f"ray job logs {job} --address {dashboard}"


def connect_ray(log_to_driver: bool = True) -> Any:
    """Join the cluster of `RAY_ADDRESS` or of `ray job submit`, else start Ray here; return the
    `ray` module. A head that cannot be joined is a UserError. `log_to_driver=False`: the
    tasks' output stays in the cluster's logs (prepare's tasks print nothing worth streaming)."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS", "")
    in_job = JOB_ENV in os.environ
    if address and not in_job:
        check_head(address)
    if address:
        target = None  # ray.init reads RAY_ADDRESS itself
    elif in_job:
        target = "auto"  # the cluster `ray job submit` runs this entrypoint on
    else:
        # A new Ray here (with its dashboard: Ray Train's placement-group cleaner polls the
        # state API it serves). None would join whatever `ray start` cluster last ran on this
        # machine (/tmp/ray/ray_current_cluster): a cluster this shell never named.
        target = "local"
    try:
        context = ray.init(address=target, log_to_driver=log_to_driver)
    except (ConnectionError, ValueError) as err:  # ValueError: an address ray.init refuses
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot join the Ray cluster at {address or 'auto'}: {reason}") from None
    _joined.update(dashboard=context.dashboard_url or "", started_here=target == "local")
    return ray


def check_head(address: str) -> None:
    """UserError unless the Ray head at `address` (host:port of its GCS) answers this client:
    reachable, and accepting its token. Other address forms are left to `ray.init`."""
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"RAY_ADDRESS={address} is a dashboard (job API) address; a driver needs the head's "
            "GCS address host:port (port 6379 by default; CLUSTER_HEAD in cluster.env)"
        )
    if "://" in address or ":" not in address:  # ray://, auto, local: Ray's own business
        return
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = _token_metadata()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S,
                              metadata=metadata)
        except grpc.RpcError as err:
            message = _probe_failure(address, err.code(), err.details() or "", bool(metadata))
            if message:
                raise UserError(message) from None


def _token_metadata() -> tuple[tuple[str, str], ...]:
    """The header Ray's own clients send: the token, only when RAY_AUTH_MODE=token."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    try:
        if not loader.has_token():
            return ()
    except AuthenticationError:
        raise UserError(
            "RAY_AUTH_MODE=token but no token is set: export RAY_AUTH_TOKEN=<the cluster's "
            f"token> ({ENV_HINT})"
        ) from None
    return tuple(loader.get_token_for_http_header().items())


def _probe_failure(address: str, code: Any, details: str, sent_token: bool) -> str | None:
    """The one line for a failed probe; None when ray.init should have its own say."""
    import grpc

    if code == grpc.StatusCode.UNAUTHENTICATED:
        if sent_token:
            return (f"the Ray cluster at {address} rejected this token (RAY_AUTH_TOKEN, else "
                    f"~/.ray/auth_token): export the token the cluster was started with "
                    f"({ENV_HINT})")
        mode = os.environ.get("RAY_AUTH_MODE") or "not set"
        return (f"the Ray cluster at {address} requires a token, and this shell sends none "
                f"(RAY_AUTH_MODE is {mode}): export RAY_AUTH_MODE=token and "
                f"RAY_AUTH_TOKEN=<the cluster's token> ({ENV_HINT})")
    # What gRPC says when an HTTP/1 server (a dashboard) answers instead of a Ray head.
    if code == grpc.StatusCode.UNAVAILABLE and any(
        sign in details.lower() for sign in ("http1", "parsing http/2")
    ):
        return (f"{address} is an HTTP server, not a Ray head: RAY_ADDRESS needs the head's "
                "GCS address (port 6379 by default), not the dashboard's")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        reason = (details.rsplit(": ", 1)[-1] if code == grpc.StatusCode.UNAVAILABLE
                  else f"no answer within {PROBE_TIMEOUT_S:.0f} s")
        return (f"no Ray head answers at {address} ({reason}): start the cluster "
                "(`make cluster-up`) or fix RAY_ADDRESS (the head's host:port)")
    return None
