"""`prepare` on a Ray cluster (`data.backend: ray`): one Ray task per shard.

Ray schedules the tasks over the cluster's CPUs and retries a task whose worker died (a lost
node) or that hit a storage error (`OSError`); the job (params and classes, no listing) goes to
the object store once, and each task carries its own rows of the listing. The driver keeps at
most a few tasks per CPU in flight, so that a listing of 100 M images does not become 100,000
queued tasks at once, and folds each summary as it arrives. Ray is imported here only: the rest
of `prepare` (and anything that imports it) runs without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pipeline.core.connect import connect_ray
from pipeline.core.errors import UserError
from pipeline.data.shard_writer import ShardJob, ShardSummary, ShardTask, write_shard_task

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # per task, on a lost worker or a storage error
TASKS_IN_FLIGHT_PER_CPU = 2


def run_on_ray(job: ShardJob, tasks: Iterator[ShardTask]) -> Iterator[ShardSummary]:
    """Summaries of `tasks` run as Ray tasks, in completion order; on exit (an error, or the
    caller closing this generator) the tasks still running are cancelled."""
    ray = connect_ray(log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES,
                        retry_exceptions=[OSError])(write_shard_task)
    job_ref = ray.put(job)
    window = max(2, TASKS_IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, ShardTask] = {}
    try:
        for task in tasks:
            if len(pending) >= window:
                yield _next_done(ray, pending)
            pending[remote.remote(job_ref, task)] = task
        while pending:
            yield _next_done(ray, pending)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _next_done(ray: Any, pending: dict[Any, ShardTask]) -> ShardSummary:
    [done], _ = ray.wait(list(pending), num_returns=1)
    task = pending.pop(done)
    try:
        return ray.get(done)
    except ray.exceptions.RayError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"prepare: the Ray task writing {task.name} failed "
                        f"(after up to {TASK_RETRIES} retries): {first}") from err
