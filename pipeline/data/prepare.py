"""The `prepare` stage: a source of images -> deterministic WebDataset shards + manifest + stats.

Streaming, in bounded memory: the source is listed first (names and labels, no pixels), the
train/val split and every shard's images are decided from that listing alone, and each shard is
then one task (`pipeline.data.shard_writer`) that decodes its images one at a time and writes
them straight into its tar. Tasks run in this process, in a pool of processes
(`data.backend: local`) or as Ray tasks on a cluster (`ray`, `pipeline.data.ray_prepare`); the
driver only lists, hands out tasks and combines their small summaries, in shard order.

Same input and params give byte-identical shards whatever the parallelism: sources are listed in
sorted order, the split is seeded, shard boundaries follow `samples_per_shard` only, tar headers
carry a fixed mtime/owner/mode, and PNG encoding is deterministic. DVC's cache and `dvc repro`'s
"up to date" rely on that.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config, DataConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.progress import progress
from pipeline.core.records import DatasetStats
from pipeline.data.images import REASONS, UNSAFE_NAME
from pipeline.data.shard_writer import (
    FAULT_ENV,
    PARTS_DIR,
    SKIPPED_PATHS_SHOWN,
    TAR_MODE,
    TAR_MTIME,
    TAR_OWNER,
    ShardJob,
    ShardSummary,
    ShardTask,
    manifest_schema,
    sample_key,
    write_shard,
    write_shard_task,
)
from pipeline.data.sources import Source, open_source

log = logging.getLogger(__name__)

__all__ = ["TAR_MODE", "TAR_MTIME", "TAR_OWNER", "prepare_dataset", "run", "sample_key",
           "split_assignments", "write_shard"]

SPLITS = ("train", "val")
SKIPPED_FILE = Path("data/skipped.tsv")  # every skipped image: index, reason, path, detail
_IGNORED_PATHS_SHOWN = 100
RAY_ENV_VARS = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")  # a cluster, or `ray job submit`


# --- split --------------------------------------------------------------------------------------


def split_assignments(
    labels: Sequence[str | None], val_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Positions of the train and val samples, stratified by label and seeded.

    The val total is round(N * val_fraction) exactly; classes get their share by largest
    remainder, so per-class rounding never changes the total. Each split comes back in a
    seeded shuffled order, so that a shard mixes classes.
    """
    rng = np.random.default_rng(seed)
    names, codes = np.unique(np.asarray([label or "" for label in labels], dtype=object),
                             return_inverse=True)
    sizes = np.bincount(codes, minlength=len(names))
    total_val = int(len(labels) * val_fraction + 0.5)
    exact = sizes * val_fraction
    quota = exact.astype(np.int64)
    by_remainder = sorted(range(len(names)), key=lambda k: (-(exact[k] - quota[k]), names[k]))
    for k in by_remainder[: max(0, total_val - int(quota.sum()))]:
        quota[k] += 1
    is_val = np.zeros(len(labels), dtype=bool)
    for k in range(len(names)):
        members = np.flatnonzero(codes == k)
        is_val[members[rng.permutation(len(members))[: quota[k]]]] = True
    val, train = np.flatnonzero(is_val), np.flatnonzero(~is_val)
    return {
        "train": train[rng.permutation(len(train))].tolist(),
        "val": val[rng.permutation(len(val))].tolist(),
    }


def shard_tasks(source: Source, splits: dict[str, list[int]],
                samples_per_shard: int) -> Iterator[ShardTask]:
    """Every shard, train first: `samples_per_shard` consecutive positions of its split's
    order (fewer in the last), with their rows of the listing. Nothing here depends on how
    many workers run them."""
    for split in SPLITS:
        order = splits[split]
        for number, start in enumerate(range(0, len(order), samples_per_shard)):
            positions = tuple(order[start : start + samples_per_shard])
            yield ShardTask(f"{split}-{number:06d}.tar", split, positions,
                            source.part(positions))


# --- backends -----------------------------------------------------------------------------------


def resolve_backend(backend: str, environ: dict[str, str] | None = None) -> str:
    """`data.backend` as run: auto = ray inside a Ray job or with RAY_ADDRESS set, else local."""
    environ = dict(os.environ) if environ is None else environ
    if backend != "auto":
        return backend
    return "ray" if any(environ.get(name) for name in RAY_ENV_VARS) else "local"


def _pool_task(job_and_task: tuple[ShardJob, ShardTask]) -> ShardSummary:
    return write_shard_task(*job_and_task)


def run_local(make_job: Callable[[], ShardJob], tasks: Iterator[ShardTask],
              processes: int) -> Iterator[ShardSummary]:
    """Summaries of `tasks` run here (1 process) or in a pool; in completion order. The job
    is made once the pool is starting: its processes import while the driver makes it."""
    if processes == 1:
        job = make_job()
        for task in tasks:
            yield write_shard_task(job, task)
        return
    # spawn: no fork of a process that already runs threads (tqdm's monitor).
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        job = make_job()  # small (no listing): sent with every task
        yield from pool.imap_unordered(_pool_task, ((job, task) for task in tasks), chunksize=1)


def _summaries(cfg: DataConfig, backend: str, make_job: Callable[[], ShardJob],
               tasks: Iterator[ShardTask], shard_count: int) -> Iterator[ShardSummary]:
    if backend == "ray":
        from pipeline.data.ray_prepare import run_on_ray

        return run_on_ray(make_job(), tasks)
    processes = min(cfg.num_processes or os.cpu_count() or 1, max(shard_count, 1))
    return run_local(make_job, tasks, processes)


# --- combining ----------------------------------------------------------------------------------


class Totals:
    """The driver's view of the run: per-shard summaries folded as they arrive."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.shards: dict[str, ShardSummary] = {}
        self.skipped = {reason: 0 for reason in REASONS}
        self.shown: dict[str, list[tuple[int, str]]] = {reason: [] for reason in REASONS}
        self.skipped["unsafe_name"] = len(source.unsafe)
        self.shown["unsafe_name"] = [
            (len(source.names) + i, f"{source.location}!{name}")
            for i, name in enumerate(source.unsafe[:SKIPPED_PATHS_SHOWN])
        ]

    def add(self, summary: ShardSummary) -> None:
        """Fold one shard in; its lists of shown paths are merged and capped, then dropped."""
        for reason, count in summary.skipped.items():
            self.skipped[reason] += count
        for index, reason, path in summary.skipped_shown:
            self.shown[reason].append((index, path))
        for reason in {reason for _, reason, _ in summary.skipped_shown}:
            # The first paths in listing order, whatever order the shards finished in.
            self.shown[reason] = sorted(self.shown[reason])[:SKIPPED_PATHS_SHOWN]
        summary.skipped_shown = []
        self.shards[summary.name] = summary

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards.values())

    def ordered(self, split: str | None = None) -> list[ShardSummary]:
        """Shard summaries in shard-name order (the fixed order every sum is taken in)."""
        return [self.shards[n] for n in sorted(self.shards)
                if split is None or self.shards[n].split == split]

    def written(self) -> list[ShardSummary]:
        return [s for s in self.ordered() if s.samples]


def _pixel_stats(shards: list[ShardSummary], channels: int) -> tuple[list[float], list[float]]:
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for shard in shards:  # a fixed order: the same float sums with 1 process or 100 nodes
        total += shard.pixel_sum
        total_sq += shard.pixel_sq_sum
        count += shard.pixel_count
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _split_stats(totals: Totals, split: str) -> dict[str, Any]:
    shards = [s for s in totals.ordered(split) if s.samples]
    classes: Counter[str] = Counter()
    for shard in shards:
        classes.update(shard.classes)
    return {
        "samples": sum(s.samples for s in shards),
        "shards": len(shards),
        "classes": {name: classes.get(name, 0) for name in totals.source.class_names},
    }


def _stats(cfg: DataConfig, totals: Totals) -> DatasetStats:
    source = totals.source
    hashes = {s.name: s.sha256 for s in totals.written()}
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name} {hashes[name]}\n".encode())
    mean, std = _pixel_stats(totals.ordered("train"), cfg.channels)
    skipped = {reason: {"count": totals.skipped[reason],
                        "paths": [path for _, path in totals.shown[reason]]}
               for reason in REASONS}
    return DatasetStats(
        source=cfg.source,
        source_kind=source.kind,
        images_found=len(source.names),
        samples=totals.samples,
        splits={split: _split_stats(totals, split) for split in SPLITS},
        shards=len(hashes),
        labelled=source.labels is not None,
        num_classes=len(source.class_names) if source.labels is not None else None,
        class_names=source.class_names,
        image_size=cfg.image_size,
        channels=cfg.channels,
        skipped_total=sum(totals.skipped.values()),
        skipped=skipped,
        ignored_files={
            "count": len(source.ignored), "paths": source.ignored[:_IGNORED_PATHS_SHOWN]
        },
        pixel_mean=mean,
        pixel_std=std,
        shard_sha256=hashes,
        dataset_sha256=digest.hexdigest(),
        skipped_list=SKIPPED_FILE.as_posix(),
    )


def _combine_parts(fs: Any, staging: str, totals: Totals, manifest: Path, skipped: Path) -> None:
    """The manifest and the skipped list, from the shards' parts in shard order (one part in
    memory at a time)."""
    import pyarrow.parquet as pq

    schema = manifest_schema()
    parts = f"{staging}/{PARTS_DIR}"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(manifest, schema) as writer, skipped.open("w") as side:
        side.write("index\treason\tpath\tdetail\n")
        for i, name in enumerate(totals.source.unsafe):
            where = f"{totals.source.location}!{name}"
            side.write(f"{len(totals.source.names) + i}\t{UNSAFE_NAME}\t{where}\t"
                       "a member name that leaves the archive\n")
        for shard in totals.ordered():
            if shard.samples:
                with fs.open(f"{parts}/{shard.name}.parquet", "rb") as stream:
                    writer.write_table(pq.read_table(stream, schema=schema))
            if shard.samples < shard.listed:
                with fs.open(f"{parts}/{shard.name}.skipped.tsv", "rb") as stream:
                    side.write(stream.read().decode())


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: Config, layout: Layout) -> DatasetStats:
    """The `prepare` stage (`stages/prepare.py`): `prepare_dataset` with the `data` params."""
    return prepare_dataset(cfg.data, layout)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _bad_image_error(first_bad: tuple[int, str, str, str]) -> UserError:
    _, path, reason, detail = first_bad
    detail = f" ({detail})" if detail else ""
    return UserError(f"{path}: bad image, {reason}{detail}; "
                     "set data.on_bad_image=skip to skip and count such files")


def _refuse_unsafe(cfg: DataConfig, source: Source) -> None:
    if source.unsafe and cfg.on_bad_image == "error":
        raise _bad_image_error((0, f"{source.location}!{source.unsafe[0]}", UNSAFE_NAME,
                                "a member name that leaves the archive"))


def _job(cfg: DataConfig, backend: str, source: Source, staging_url: str) -> ShardJob:
    fault = os.environ.get(FAULT_ENV, "")
    if fault and backend != "ray":
        raise UserError(f"{FAULT_ENV} (a test's injected fault) needs data.backend=ray")
    return ShardJob(tuple(source.class_names), cfg.image_size, cfg.channels, cfg.min_side_px,
                    cfg.on_bad_image == "error", staging_url, manifest_schema(), fault)


class FirstBadShard:
    """`on_bad_image: error`'s verdict, the same whatever order the shards finish in: the
    first bad image of the first shard (in shard order) that has one, once every shard
    before it has finished without one."""

    def __init__(self) -> None:
        self.position: dict[str, int] = {}  # shard name -> its place in shard order
        self.done: set[int] = set()  # finished shards after the frontier
        self.frontier = 0  # every shard before this one has finished
        self.bad: dict[int, tuple[int, str, str, str]] = {}

    def numbered(self, tasks: Iterator[ShardTask]) -> Iterator[ShardTask]:
        """`tasks`, noting each one's place as it is handed out."""
        for task in tasks:
            self.position[task.name] = len(self.position)
            yield task

    def settled(self, summary: ShardSummary) -> tuple[int, str, str, str] | None:
        """Fold in a finished shard; the first bad image once no earlier shard is pending."""
        position = self.position[summary.name]
        self.done.add(position)
        if summary.first_bad is not None:
            self.bad[position] = summary.first_bad
        while self.frontier in self.done:  # only shards past the frontier stay in `done`
            self.done.remove(self.frontier)
            self.frontier += 1
        first = min(self.bad, default=None)
        return self.bad[first] if first is not None and first < self.frontier else None


def _write_all(cfg: DataConfig, backend: str, source: Source, staging_url: str) -> Totals:
    splits = split_assignments(source.labels or [None] * len(source.names), cfg.val_fraction,
                               cfg.seed)
    shard_count = sum(-(-len(v) // cfg.samples_per_shard) for v in splits.values())
    totals, first_bad = Totals(source), FirstBadShard()
    bar = progress(total=len(source.names), desc=f"prepare ({backend})", unit="img")
    summaries = _summaries(cfg, backend, functools.partial(_job, cfg, backend, source, staging_url),
                           first_bad.numbered(shard_tasks(source, splits, cfg.samples_per_shard)),
                           shard_count)
    try:
        for summary in summaries:
            totals.add(summary)
            bar.update(summary.listed)
            found = first_bad.settled(summary)
            if found is not None:
                raise _bad_image_error(found)
    finally:
        close = getattr(summaries, "close", None)
        if close is not None:
            close()  # stops the pool or cancels the Ray tasks still running
        bar.close()
    return totals


def prepare_dataset(cfg: DataConfig, layout: Layout) -> DatasetStats:
    """Run `prepare`: shards under `data.shards_dir`, `data/manifest.parquet`,
    `data/skipped.tsv` and `data/stats.json` under the layout.

    Raises `UserError` for a missing source, a source without any valid image, or (with
    `on_bad_image: error`) a bad image. Old outputs are replaced only on success.
    """
    backend = resolve_backend(cfg.backend)
    out_url = layout.shards(cfg.shards_dir)
    staging_url = out_url.rstrip("/") + ".partial"
    fs, staging = _fs(staging_url)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    fs.makedirs(staging, exist_ok=True)
    try:
        source = open_source(cfg.source, scratch=f"{staging_url}/_work")
        log.info("%s: %d images (%s), backend %s", cfg.source, len(source.names), source.kind,
                 backend)
        _refuse_unsafe(cfg, source)
        totals = _write_all(cfg, backend, source, staging_url)
        if not totals.samples:
            listed = len(source.names) + len(source.unsafe)
            summary = ", ".join(f"{n} {r}" for r, n in sorted(totals.skipped.items()) if n)
            raise UserError(f"data.source {cfg.source}: no valid image among {listed} ({summary})")
        stats = _stats(cfg, totals)
        manifest, skipped = (Path(f"{p}.partial") for p in (layout.manifest,
                                                              layout.path(SKIPPED_FILE)))
        _combine_parts(fs, staging, totals, manifest, skipped)
    except BaseException:
        fs.rm(staging, recursive=True)
        raise
    for leftover in (PARTS_DIR, "_work"):
        if fs.exists(f"{staging}/{leftover}"):
            fs.rm(f"{staging}/{leftover}", recursive=True)
    _, out = _fs(out_url)
    if fs.exists(out):
        fs.rm(out, recursive=True)
    fs.mv(staging, out, recursive=True)
    manifest.replace(layout.manifest)
    skipped.replace(layout.path(SKIPPED_FILE))
    stats.save(layout)
    log.info(
        "wrote %d train + %d val samples in %d shards; skipped %d",
        stats.split_samples("train"), stats.split_samples("val"), stats.shards,
        stats.skipped_total,
    )
    return stats
