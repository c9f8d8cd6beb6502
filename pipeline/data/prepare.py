"""The `prepare` stage: a source of images -> deterministic WebDataset shards + manifest + stats.

Same input and params give byte-identical shards: sources are listed in sorted order, the
split is seeded, tar headers carry a fixed mtime/owner/mode, and PNG encoding is deterministic.
DVC's cache and `dvc repro`'s "up to date" rely on that.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import Config, DataConfig
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.core.layout import Layout
from pipeline.core.progress import progress
from pipeline.core.records import DatasetStats
from pipeline.data.images import (
    REASONS,
    UNREADABLE,
    UNSAFE_NAME,
    BadImage,
    PreparedImage,
    prepare_array,
    prepare_bytes,
)
from pipeline.data.sources import Item, Source, open_source

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Fixed tar header fields: nothing in a shard depends on when or by whom it was written.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_OWNER = "dcgan"
TAR_MODE = 0o444
_IGNORED_PATHS_SHOWN = 100
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


@dataclass(frozen=True)
class Outcome:
    """What became of one source item: a prepared image, or a skip reason."""

    index: int
    name: str
    path: str
    label: str | None
    image: PreparedImage | None = None
    reason: str = ""
    detail: str = ""


# --- decoding (runs in the process pool) --------------------------------------------------------


def process_item(item: Item, *, image_size: int, channels: int, min_side_px: int) -> Outcome:
    """Decode and prepare one item; never raises for a bad image (the reason is returned)."""
    options = {"image_size": image_size, "channels": channels, "min_side_px": min_side_px}
    try:
        if item.refused:
            raise BadImage(item.refused, item.detail)
        if item.pixels is not None:
            image = prepare_array(item.pixels, **options)
        else:
            data = item.data
            if item.file is not None:
                try:
                    data = Path(item.file).read_bytes()
                except OSError as err:
                    raise BadImage(UNREADABLE, err.strerror or str(err)) from err
            image = prepare_bytes(data or b"", **options)
    except BadImage as bad:
        return Outcome(item.index, item.name, item.path, item.label, None, bad.reason, bad.detail)
    return Outcome(item.index, item.name, item.path, item.label, image)


def _decode_all(source: Source, cfg: DataConfig) -> list[Outcome]:
    """Prepare every item with a process pool; stop at the first bad one if asked to."""
    work = functools.partial(
        process_item,
        image_size=cfg.image_size,
        channels=cfg.channels,
        min_side_px=cfg.min_side_px,
    )
    num_processes = cfg.num_processes or os.cpu_count() or 1
    outcomes: list[Outcome] = []
    total = len(source.names) + len(source.unsafe)
    bar = progress(total=total, desc="prepare: decoding", unit="img")
    unsafe = [
        Outcome(len(source.names) + i, name, f"{source.location}!{name}", None, None,
                UNSAFE_NAME, "a member name that leaves the archive")
        for i, name in enumerate(source.unsafe)
    ]
    _collect(unsafe, outcomes, bar, cfg)
    try:
        if num_processes == 1:
            results: Iterable[Outcome] = map(work, source.items())
            _collect(results, outcomes, bar, cfg)
        else:
            # spawn: no fork of a process that already runs threads (tqdm's monitor).
            context = multiprocessing.get_context("spawn")
            with context.Pool(num_processes) as pool:
                _collect(pool.imap(work, source.items(), chunksize=32), outcomes, bar, cfg)
    except _ARCHIVE_ERRORS as err:
        raise UserError(f"data.source {source.location}: cannot read it ({err})") from err
    finally:
        bar.close()
    return sorted(outcomes, key=lambda o: o.index)


def _collect(results: Iterable[Outcome], into: list[Outcome], bar: tqdm, cfg: DataConfig):
    for outcome in results:
        if outcome.image is None and cfg.on_bad_image == "error":
            detail = f" ({outcome.detail})" if outcome.detail else ""
            raise UserError(
                f"{outcome.path}: bad image, {outcome.reason}{detail}; "
                "set data.on_bad_image=skip to skip and count such files"
            )
        into.append(outcome)
        bar.update()


# --- split --------------------------------------------------------------------------------------


def split_assignments(
    labels: list[str | None], val_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Positions of the train and val samples, stratified by label and seeded.

    The val total is round(N * val_fraction) exactly; classes get their share by largest
    remainder, so per-class rounding never changes the total. Each split comes back in a
    seeded shuffled order, so that a shard mixes classes.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(label or "", []).append(position)
    names = sorted(groups)
    total_val = int(len(labels) * val_fraction + 0.5)
    exact = {n: len(groups[n]) * val_fraction for n in names}
    quota = {n: int(exact[n]) for n in names}
    by_remainder = sorted(names, key=lambda n: (-(exact[n] - quota[n]), n))
    for name in by_remainder[: max(0, total_val - sum(quota.values()))]:
        quota[name] += 1
    val: list[int] = []
    for name in names:
        members = np.asarray(groups[name])
        val.extend(members[rng.permutation(len(members))[: quota[name]]].tolist())
    val = sorted(val)
    val_set = set(val)
    train = [p for p in range(len(labels)) if p not in val_set]
    return {
        "train": [train[i] for i in rng.permutation(len(train))],
        "val": [val[i] for i in rng.permutation(len(val))],
    }


# --- writing ------------------------------------------------------------------------------------


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


def write_shard(path: Path, samples: Iterable[dict[str, bytes]]) -> None:
    """Write samples ({"__key__": key, ext: bytes}) as a tar with fixed headers, sorted members."""
    with open(path, "wb") as stream, tarfile.open(
        fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT
    ) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                tar.addfile(*_tar_member(f"{key}.{ext}", sample[ext]))


def _members(outcome: Outcome, class_index: dict[str, int]) -> dict[str, bytes]:
    image = outcome.image
    assert image is not None
    meta = {"source_path": outcome.name, "width": image.width, "height": image.height}
    sample = {
        "__key__": sample_key(outcome.index),
        "png": image.png,
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    if outcome.label is not None:
        sample["cls"] = str(class_index[outcome.label]).encode("ascii")
    return sample


def _chunks(items: list[Outcome], size: int) -> Iterator[list[Outcome]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_splits(
    good: list[Outcome], splits: dict[str, list[int]], out_dir: Path, cfg: DataConfig,
    class_index: dict[str, int],
) -> list[dict]:
    """Write every split's shards into `out_dir`; return one manifest row per sample."""
    rows = []
    for split in SPLITS:
        ordered = [good[p] for p in splits[split]]
        for number, chunk in enumerate(_chunks(ordered, cfg.samples_per_shard)):
            shard = f"{split}-{number:06d}.tar"
            write_shard(out_dir / shard, (_members(o, class_index) for o in chunk))
            for o in chunk:
                assert o.image is not None
                rows.append({
                    "key": sample_key(o.index),
                    "split": split,
                    "shard": shard,
                    "label": class_index[o.label] if o.label is not None else None,
                    "class_name": o.label,
                    "source_path": o.name,
                    "sha256": o.image.sha256,
                    "width": o.image.width,
                    "height": o.image.height,
                })
    return rows


def _write_manifest(rows: list[dict], path: Path) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=[
        "key", "split", "shard", "label", "class_name", "source_path", "sha256", "width", "height",
    ])
    table["label"] = table["label"].astype("Int64")
    table.to_parquet(path, index=False)


# --- statistics ---------------------------------------------------------------------------------


def _pixel_stats(outcomes: list[Outcome], channels: int) -> tuple[list[float], list[float]]:
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for o in outcomes:
        assert o.image is not None
        total += o.image.pixel_sum
        total_sq += o.image.pixel_sq_sum
        count += o.image.pixel_count
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _stats(
    cfg: DataConfig, source: Source, outcomes: list[Outcome], good: list[Outcome],
    splits: dict[str, list[int]], rows: list[dict], shard_hashes: dict[str, str],
) -> DatasetStats:
    bad = [o for o in outcomes if o.image is None]
    skipped = {reason: {"count": 0, "paths": []} for reason in REASONS}
    for o in bad:
        skipped[o.reason]["count"] += 1
        skipped[o.reason]["paths"].append(o.path)
    split_stats = {}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        classes = Counter(r["class_name"] for r in split_rows if r["class_name"] is not None)
        split_stats[split] = {
            "samples": len(split_rows),
            "shards": len({r["shard"] for r in split_rows}),
            "classes": {name: classes.get(name, 0) for name in source.class_names},
        }
    mean, std = _pixel_stats([good[p] for p in splits["train"]], cfg.channels)
    digest = hashlib.sha256()
    for name in sorted(shard_hashes):
        digest.update(f"{name} {shard_hashes[name]}\n".encode())
    return DatasetStats(
        source=cfg.source,
        source_kind=source.kind,
        images_found=len(source.names),
        samples=len(good),
        splits=split_stats,
        shards=len(shard_hashes),
        labelled=source.labels is not None,
        num_classes=len(source.class_names) if source.labels is not None else None,
        class_names=source.class_names,
        image_size=cfg.image_size,
        channels=cfg.channels,
        skipped_total=len(bad),
        skipped=skipped,
        ignored_files={
            "count": len(source.ignored), "paths": source.ignored[:_IGNORED_PATHS_SHOWN]
        },
        pixel_mean=mean,
        pixel_std=std,
        shard_sha256=shard_hashes,
        dataset_sha256=digest.hexdigest(),
    )


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: Config, layout: Layout) -> DatasetStats:
    """The `prepare` stage (`stages/prepare.py`): `prepare_dataset` with the `data` params."""
    return prepare_dataset(cfg.data, layout)


def prepare_dataset(cfg: DataConfig, layout: Layout) -> DatasetStats:
    """Run `prepare`: shards, `data/manifest.parquet` and `data/stats.json` under the layout.

    Raises `UserError` for a missing source, a source without any valid image, or (with
    `on_bad_image: error`) the first bad image. Old outputs are replaced only on success.
    """
    source = open_source(cfg.source)
    log.info("%s: %d images (%s)", cfg.source, len(source.names), source.kind)
    outcomes = _decode_all(source, cfg)
    good = [o for o in outcomes if o.image is not None]
    if not good:
        reasons = Counter(o.reason for o in outcomes)
        summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        raise UserError(
            f"data.source {cfg.source}: no valid image among {len(outcomes)} ({summary})"
        )
    splits = split_assignments([o.label for o in good], cfg.val_fraction, cfg.seed)
    class_index = {name: i for i, name in enumerate(source.class_names)}

    shards_dir = layout.shards_dir
    staging = shards_dir.with_name(shards_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows = _write_splits(good, splits, staging, cfg, class_index)
    shard_hashes = {p.name: sha256_file(p) for p in sorted(staging.glob("*.tar"))}
    stats = _stats(cfg, source, outcomes, good, splits, rows, shard_hashes)

    shutil.rmtree(shards_dir, ignore_errors=True)
    staging.rename(shards_dir)
    _write_manifest(rows, layout.manifest)
    stats.save(layout)
    log.info(
        "wrote %d train + %d val samples in %d shards; skipped %d",
        stats.split_samples("train"), stats.split_samples("val"), stats.shards,
        stats.skipped_total,
    )
    return stats
