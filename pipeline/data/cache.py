"""Decode once, keep it decoded: a split as one uint8 tensor, and training batches by index.

`train.data_cache` says where a worker keeps the decoded train split:

* `device`: on the GPU; a batch is one `index_select` there, nothing crosses the bus;
* `host`: in host memory; a GPU worker gathers each batch into one of a few reusable pinned
  staging buffers (`PinnedStaging`) and copies it, uint8, one batch ahead on a copy stream that
  overlaps the step (the split itself is not pinned: pinning copies it into a block rounded
  up to a power of two while the pageable split is still alive);
* `stream`: no cache, the shard loader (`pipeline.data.loader.EpochLoader`), for splits that
  fit nowhere;
* `auto`: `device` when the split takes at most `DEVICE_SHARE` of the free GPU memory, else
  `host` when it takes at most `HOST_SHARE` of the available RAM, else `stream`. The choice
  and the reason are logged.

Batches are drawn by index: a seeded permutation per (seed, epoch), global batch `b` made of
positions `b*G .. (b+1)*G` of it and rank `r` taking its `r`-th share, so every sample is seen
at most once per epoch, the ranks' shares are disjoint and every rank runs the same number of
steps. A resumed run starts at batch `skip_batches` of the same permutation (no decoding).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.core.progress import progress
from pipeline.data.loader import EpochLoader
from pipeline.data.reader import decode_sample, read_shard

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "device", "host", "stream")
DEVICE_SHARE = 0.25  # of the free GPU memory: the rest is for activations
HOST_SHARE = 0.5  # of the available RAM: every worker of a node holds its own copy
# A spawned decoder costs ~2 s before its first image (it imports torch): worth it only for a
# split that one process needs longer than that for (~4,700 MNIST samples/s per core, measured;
# BENCHMARKS section 3). Below this many samples per process, fewer processes.
DECODE_SAMPLES_PER_PROCESS = 20_000

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class CacheChoice:
    """Where the decoded split lives (`device`, `host` or `stream`) and why."""

    mode: str
    reason: str


def available_host_bytes() -> int:
    """RAM available to new allocations (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_cache(requested: str, split_bytes: int, device: torch.device,
                 host_bytes: int | None = None, device_bytes: int | None = None) -> CacheChoice:
    """The cache mode for a split of `split_bytes` (see the module docstring). Explicit modes
    are honoured, except `device` without a GPU, which means `host`."""
    if requested not in CACHE_MODES:
        raise UserError(f"train.data_cache must be one of {', '.join(CACHE_MODES)}")
    size = f"{split_bytes / 2**20:.1f} MiB"
    if requested == "stream":
        return CacheChoice("stream", "train.data_cache=stream")
    on_gpu = device.type == "cuda"
    if requested in ("auto", "device") and on_gpu:
        free = device_bytes if device_bytes is not None else torch.cuda.mem_get_info(device)[0]
        if requested == "device" or split_bytes <= DEVICE_SHARE * free:
            return CacheChoice("device", f"the split ({size}) fits in {DEVICE_SHARE:.0%} of the "
                                         f"{free / 2**30:.1f} GiB free on {device}")
    if requested == "host" or (requested == "device" and not on_gpu):
        return CacheChoice("host", f"train.data_cache={requested} ({size})")
    available = host_bytes if host_bytes is not None else available_host_bytes()
    if split_bytes <= HOST_SHARE * available:
        return CacheChoice("host", f"the split ({size}) fits in {HOST_SHARE:.0%} of the "
                                   f"{available / 2**30:.1f} GiB of available RAM")
    return CacheChoice("stream", f"the split ({size}) fits neither on the device nor in "
                                 f"{HOST_SHARE:.0%} of the available RAM: streaming shards")


# --- decoding ---------------------------------------------------------------------------------


def _decode_shard(job: tuple[str, bool]) -> tuple[np.ndarray, np.ndarray | None]:
    """Every sample of one shard (url, with_labels): uint8 (n, C, H, W), int64 labels or None."""
    url, with_labels = job
    decoded = [decode_sample(sample, url, with_labels) for sample in read_shard(url)]
    if not decoded:
        return np.zeros((0, 0, 0, 0), np.uint8), (np.zeros(0, np.int64) if with_labels else None)
    pixels = np.stack([image for image, _ in decoded]).transpose(0, 3, 1, 2)
    labels = np.asarray([label for _, label in decoded], np.int64) if with_labels else None
    return np.ascontiguousarray(pixels), labels


def decode_split(urls: list[str], *, with_labels: bool = False, num_processes: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode every sample of `urls`, in shard order: uint8 (N, C, H, W) and labels (or None).
    Shards are decoded in `num_processes` processes (spawned: the caller may run threads)."""
    jobs = [(url, with_labels) for url in urls]
    parts = []
    with progress(total=len(urls), desc="decoding the split into memory", unit="shard") as bar:
        for pixels, labels in _decoded(jobs, num_processes):
            if len(pixels):
                parts.append((pixels, labels))
            bar.update()
    if not parts:
        raise UserError(f"no samples in the {len(urls)} shard(s) starting with {urls[0]}")
    shapes = {pixels.shape[1:] for pixels, _ in parts}
    if len(shapes) > 1:
        raise UserError(f"the shards hold images of different shapes: {sorted(shapes)}")
    pixels = torch.from_numpy(np.concatenate([p for p, _ in parts]))
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts])) if with_labels else None
    return pixels, labels


def decode_process_count(num_samples: int, most: int) -> int:
    """How many processes decode a split of `num_samples`: at most `most`, and one for every
    `DECODE_SAMPLES_PER_PROCESS` (a small split decodes faster than a pool starts)."""
    return max(1, min(most, num_samples // DECODE_SAMPLES_PER_PROCESS))


def _decoded(jobs: list[tuple[str, bool]], num_processes: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    if num_processes <= 1 or len(jobs) == 1:
        yield from map(_decode_shard, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        yield from pool.imap(_decode_shard, jobs)


# --- batches by index -------------------------------------------------------------------------


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the samples in `epoch`: the same on every rank, device and platform."""
    digest = hashlib.sha256(f"dcgan/{seed}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(num_samples, generator=generator)


class PinnedStaging:
    """A ring of `count` batch-sized host buffers (pinned where `device` is a GPU) that the
    host cache gathers into, and the copy of each to `device` on a copy stream.

    `fetch(pixels, index)` gathers rows `index` of `pixels` into the next buffer
    (`torch.index_select(..., out=)`: no pageable temporary, no second pinning) and starts its
    copy; `ready(images, copied)` makes the current stream wait for that copy (`wait_event`)
    and tells the allocator the batch is used there (`record_stream`). A buffer is gathered
    into again only after the copy out of it finished (its event), `count` batches later. On
    a CPU the ring and the gather run without streams (how the rotation is tested)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, count: int = 3) -> None:
        on_gpu = device.type == "cuda"
        self.device = device
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=on_gpu)
                        for _ in range(count)]
        self.copied: list[torch.cuda.Event | None] = [None] * count
        self.stream = torch.cuda.Stream(device) if on_gpu else None
        self.next = 0

    def fetch(self, pixels: torch.Tensor, index: torch.Tensor
              ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Rows `index` of the host tensor `pixels` on the way to `device`, and the event of
        their copy (None on a CPU)."""
        slot = self.next
        self.next = (slot + 1) % len(self.buffers)
        buffer = self.buffers[slot][: len(index)]
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # its last copy is done: safe to overwrite
        torch.index_select(pixels, 0, index, out=buffer)
        if self.stream is None:
            return buffer, None
        with torch.cuda.stream(self.stream):
            images = buffer.to(self.device, non_blocking=True)
            done = self.copied[slot] = torch.cuda.Event()
            done.record(self.stream)
        return images, done

    def ready(self, images: torch.Tensor, copied: torch.cuda.Event | None) -> torch.Tensor:
        """`images` from `fetch`, safe to use on the current stream."""
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            images.record_stream(current)
        return images


class CachedBatches:
    """One rank's training batches from a decoded split: `batches(epoch, skip_batches)` yields
    exactly `num_batches - skip_batches` batches (uint8 images on `device`, labels or None)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor | None, *, batch_size: int,
                 rank: int, world_size: int, num_batches: int, seed: int,
                 device: torch.device, on_device: bool) -> None:
        global_batch = batch_size * world_size
        if num_batches * global_batch > len(pixels):
            raise UserError(f"{num_batches} steps of {global_batch} images need "
                            f"{num_batches * global_batch} samples, the split has {len(pixels)}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.rank, self.global_batch = batch_size, rank, global_batch
        self.num_batches, self.seed, self.device = num_batches, seed, device
        self.num_samples = len(pixels)
        self.gather_on = device if on_device else torch.device("cpu")
        self.pixels = pixels.to(self.gather_on)
        self.labels = labels.to(self.gather_on) if labels is not None else None
        # Host cache, GPU worker: uint8 batches cross the bus through pinned staging buffers.
        self.staging = (PinnedStaging((batch_size, *pixels.shape[1:]), device)
                        if self.gather_on != device else None)

    def _indices(self, batch: int, order: torch.Tensor) -> torch.Tensor:
        start = batch * self.global_batch + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def _fetch(self, index: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """(images, their copy's event or None, labels): a batch whose copy has started."""
        labels = self.labels.index_select(0, index) if self.labels is not None else None
        if self.staging is not None:
            return (*self.staging.fetch(self.pixels, index), labels)
        return self.pixels.index_select(0, index), None, labels

    def _ready(self, fetched: tuple[torch.Tensor, Any, torch.Tensor | None]) -> Batch:
        images, copied, labels = fetched
        if self.staging is not None:
            images = self.staging.ready(images, copied)
        return images, labels

    def __call__(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        if not 0 <= skip_batches <= self.num_batches:
            raise UserError(f"skip_batches {skip_batches} is outside 0..{self.num_batches}")
        # The epoch's order where the gather runs, once per epoch: a per-batch copy of its
        # slice from pageable host memory would make CUDA sync the host every step.
        order = epoch_permutation(self.num_samples, self.seed, epoch).to(self.gather_on)
        pending = None
        for batch in range(skip_batches, self.num_batches):
            ahead = self._fetch(self._indices(batch, order))  # its copy starts now
            if pending is not None:
                yield self._ready(pending)
            pending = ahead
        if pending is not None:
            yield self._ready(pending)


def training_batches(urls: list[str], *, cache: str, split_shape: tuple[int, ...],
                     batch_size: int, rank: int, world_size: int, num_batches: int, seed: int,
                     device: torch.device, decode_processes: int, loader_workers: int,
                     with_labels: bool = False) -> CachedBatches | EpochLoader:
    """One rank's training batch source: the decoded split where `cache` (and `choose_cache`)
    put it, else the streaming shard loader. `split_shape` is (N, C, H, W) of the split."""
    split_bytes = int(np.prod(split_shape))
    choice = choose_cache(cache, split_bytes, device)
    if rank == 0:
        log.info("train data: %s (%s)", choice.mode, choice.reason)
    if choice.mode == "stream":
        return EpochLoader(urls, batch_size=batch_size, rank=rank, world_size=world_size,
                           num_batches=num_batches, seed=seed, loader_workers=loader_workers,
                           pin_memory=device.type == "cuda", with_labels=with_labels)
    processes = decode_process_count(split_shape[0], decode_processes)
    pixels, labels = decode_split(urls, with_labels=with_labels, num_processes=processes)
    return CachedBatches(pixels, labels, batch_size=batch_size, rank=rank,
                         world_size=world_size, num_batches=num_batches, seed=seed,
                         device=device, on_device=choice.mode == "device")
