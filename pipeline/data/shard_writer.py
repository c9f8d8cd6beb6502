"""Write one shard: decode its images in order, stream them into a tar, summarise what was done.

This is the work of one decode process (local backend) or one Ray task (ray backend): it gets
what every shard shares (`ShardJob`) and a shard's part of the listing (`ShardTask`: its
positions and their rows, never the whole listing), reads and prepares those images one at a
time (memory: one image), writes `<out>/<shard>.tar`, its manifest rows
(`<out>/_parts/<shard>.parquet`) and its skipped images (`<out>/_parts/<shard>.skipped.tsv`),
and returns a small `ShardSummary`. Running the same task twice writes the same bytes, so a
retried task simply overwrites what a failed attempt left.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.data.images import REASONS, UNREADABLE, BadImage, prepare_array, prepare_bytes
from pipeline.data.sources import Item, Source, SourceReader

log = logging.getLogger(__name__)

# Fixed tar header fields: nothing in a shard depends on when or by whom it was written.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_OWNER = "dcgan"
TAR_MODE = 0o444
PARTS_DIR = "_parts"  # per-shard manifest rows and skipped lists, combined by the driver
SKIPPED_PATHS_SHOWN = 100  # per reason, in stats.json; the full list goes to the side file
# Tests: "<shard name>" makes the task writing that shard die once (os._exit, as a lost
# worker) after a marker file in the output records it; read once by the driver.
FAULT_ENV = "DCGAN_PREPARE_FAULT"
MANIFEST_COLUMNS = ("key", "split", "shard", "label", "class_name", "source_path", "sha256",
                    "width", "height")


@dataclass(frozen=True)
class ShardJob:
    """What every shard task shares: the image params, the classes, where shards go."""

    class_names: tuple[str, ...]  # a sample's `cls` is its label's index here
    image_size: int
    channels: int
    min_side_px: int
    stop_on_bad_image: bool
    out_url: str  # the staging folder (a path or fsspec URL every worker reaches)
    # The manifest's Arrow schema (`manifest_schema`), made once by the driver: it needs
    # pandas, whose import would cost every decode process 0.6 s.
    manifest_schema: Any
    fault_shard: str = ""


@dataclass(frozen=True)
class ShardTask:
    """One shard: its file name, split, the listing positions of its images in order, and
    those rows of the listing (`Source.part`)."""

    name: str
    split: str
    positions: tuple[int, ...]
    rows: Source


@dataclass
class ShardSummary:
    """What the driver needs of a written shard: a few numbers, never its images."""

    name: str
    split: str
    listed: int  # images assigned to it (good + bad)
    samples: int = 0
    sha256: str = ""  # "" when no image survived (no file is written)
    classes: dict[str, int] = field(default_factory=dict)
    pixel_sum: list[float] = field(default_factory=list)
    pixel_sq_sum: list[float] = field(default_factory=list)
    pixel_count: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_shown: list[tuple[int, str, str]] = field(default_factory=list)  # index, reason, path
    first_bad: tuple[int, str, str, str] | None = None  # index, path, reason, detail


def sample_key(index: int) -> str:
    """The WebDataset key of the `index`-th image of the sorted source listing (no dots)."""
    return f"{index:08d}"


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = TAR_OWNER
    return info, io.BytesIO(data)


class _HashingWriter:
    """A write-only stream that hashes what goes through it (no second read of the shard)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()
        self.position = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.position += len(data)
        return self.stream.write(data) or len(data)

    def tell(self) -> int:
        return self.position


def write_tar(stream: IO[bytes], samples: Iterable[dict[str, bytes]]) -> str:
    """Write samples ({"__key__": key, ext: bytes}) as a tar with fixed headers and sorted
    members to `stream`, as they come; return the tar's SHA-256."""
    writer = _HashingWriter(stream)
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[arg-type]
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                tar.addfile(*_tar_member(f"{key}.{ext}", sample[ext]))
    return writer.digest.hexdigest()


def write_shard(path: Path, samples: Iterable[dict[str, bytes]]) -> str:
    """`write_tar` into the file `path`; returns its SHA-256."""
    with open(path, "wb") as stream:
        return write_tar(stream, samples)


def process_item(item: Item, *, image_size: int, channels: int, min_side_px: int) -> Any:
    """Decode and prepare one item: a `PreparedImage`, or the `BadImage` saying why not."""
    options = {"image_size": image_size, "channels": channels, "min_side_px": min_side_px}
    try:
        if item.refused:
            raise BadImage(item.refused, item.detail)
        if item.pixels is not None:
            return prepare_array(item.pixels, **options)
        data = item.data
        if item.file is not None:
            try:
                data = Path(item.file).read_bytes()
            except OSError as err:
                raise BadImage(UNREADABLE, err.strerror or str(err)) from err
        return prepare_bytes(data or b"", **options)
    except BadImage as bad:
        return bad


class _Shard:
    """The running totals of one shard while its samples stream into the tar."""

    def __init__(self, job: ShardJob, task: ShardTask) -> None:
        self.job, self.task = job, task
        self.class_index = {name: i for i, name in enumerate(job.class_names)}
        self.summary = ShardSummary(task.name, task.split, len(task.positions),
                                    skipped={r: 0 for r in REASONS})
        self.sums = np.zeros(job.channels)
        self.sq_sums = np.zeros(job.channels)
        self.rows: list[dict[str, Any]] = []
        self.bad: list[str] = []

    def samples(self, reader: SourceReader) -> Iterable[dict[str, bytes]]:
        """The shard's samples, each decoded just before it is written."""
        job = self.job
        for position in self.task.positions:
            item = reader.item(position)
            result = process_item(item, image_size=job.image_size, channels=job.channels,
                                  min_side_px=job.min_side_px)
            if isinstance(result, BadImage):
                self._skip(item, result)
                continue
            yield self._keep(item, result)

    def _skip(self, item: Item, bad: BadImage) -> None:
        summary = self.summary
        summary.skipped[bad.reason] += 1
        if summary.skipped[bad.reason] <= SKIPPED_PATHS_SHOWN:
            summary.skipped_shown.append((item.index, bad.reason, item.path))
        self.bad.append(f"{item.index}\t{bad.reason}\t{item.path}\t{_one_line(bad.detail)}\n")
        if self.job.stop_on_bad_image and (
            summary.first_bad is None or item.index < summary.first_bad[0]
        ):
            summary.first_bad = (item.index, item.path, bad.reason, bad.detail)

    def _keep(self, item: Item, image: Any) -> dict[str, bytes]:
        summary = self.summary
        summary.samples += 1
        if item.label is not None:
            summary.classes[item.label] = summary.classes.get(item.label, 0) + 1
        self.sums += image.pixel_sum
        self.sq_sums += image.pixel_sq_sum
        summary.pixel_count += image.pixel_count
        label = self.class_index[item.label] if item.label is not None else None
        self.rows.append({
            "key": sample_key(item.index), "split": self.task.split, "shard": self.task.name,
            "label": label, "class_name": item.label, "source_path": item.name,
            "sha256": image.sha256, "width": image.width, "height": image.height,
        })
        meta = {"source_path": item.name, "width": image.width, "height": image.height}
        sample = {"__key__": sample_key(item.index), "png": image.png,
                  "json": json.dumps(meta, sort_keys=True).encode()}
        if label is not None:
            sample["cls"] = str(label).encode("ascii")
        return sample

    def finish(self, sha256: str) -> ShardSummary:
        summary = self.summary
        summary.sha256 = sha256 if summary.samples else ""
        summary.pixel_sum = self.sums.tolist()
        summary.pixel_sq_sum = self.sq_sums.tolist()
        return summary


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def manifest_schema() -> Any:
    """The manifest's Arrow schema, with pandas' metadata (label reads back as Int64)."""
    import pandas as pd
    import pyarrow as pa

    types = {"label": "Int64", "width": "int64", "height": "int64"}
    empty = pd.DataFrame({c: pd.Series(dtype=types.get(c, "str")) for c in MANIFEST_COLUMNS})
    return pa.Schema.from_pandas(empty, preserve_index=False)


def _write_parts(fs: Any, root: str, shard: _Shard) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = f"{root}/{PARTS_DIR}"
    fs.makedirs(parts, exist_ok=True)
    table = pa.Table.from_pylist(shard.rows, schema=shard.job.manifest_schema)
    with fs.open(f"{parts}/{shard.task.name}.parquet", "wb") as stream:
        pq.write_table(table, stream)
    if shard.bad:
        with fs.open(f"{parts}/{shard.task.name}.skipped.tsv", "wb") as stream:
            stream.write("".join(shard.bad).encode())


def _maybe_fail(job: ShardJob, task: ShardTask, fs: Any, root: str) -> None:
    """The injected fault (tests): die once, as a worker whose node went away."""
    if job.fault_shard != task.name:
        return
    marker = f"{root}/{PARTS_DIR}/fault-{task.name}"
    if fs.exists(marker):
        return
    fs.makedirs(f"{root}/{PARTS_DIR}", exist_ok=True)
    with fs.open(marker, "wb") as stream:
        stream.write(b"fired\n")
    log.warning("fault injection: the task writing %s exits", task.name)
    os._exit(1)


def write_shard_task(job: ShardJob, task: ShardTask) -> ShardSummary:
    """Decode the task's images and write its shard and parts under `job.out_url`."""
    fs, root = _fs(job.out_url)
    _maybe_fail(job, task, fs, root)
    shard = _Shard(job, task)
    path = f"{root}/{task.name}"
    with task.rows.reader() as reader, fs.open(path, "wb") as stream:
        sha256 = write_tar(stream, shard.samples(reader))
    summary = shard.finish(sha256)
    if not summary.samples:
        fs.rm(path)  # every image of it was bad: no empty shard for readers to trip on
    _write_parts(fs, root, shard)
    return summary
