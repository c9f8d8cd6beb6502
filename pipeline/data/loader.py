"""Reading shards back: resampled, deterministic training batches and a plain in-order pass.

Training (`EpochLoader`; `train_batches` for a single epoch) gives every rank exactly
`num_batches` batches per epoch whatever the number and sizes of the shards: each (rank, loader
worker) draws an endless, seeded stream of shards (every shard once per cycle, in a fresh order
each cycle) through a shuffle buffer, and the epoch is cut at `num_batches` (the WebDataset
"resampled + with_epoch" pattern). Streams are seeded by (seed, epoch, rank, worker) only, so a
resumed run that skips `skip_batches` sees the same remaining batches as an uninterrupted run
(with the same `loader_workers`).

Shards are read by `pipeline.data.reader` (streamed, only png/cls members). A stream that
goes through every shard once without a usable sample stops with an error saying what the
shards hold, instead of cycling forever.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.errors import UserError
from pipeline.data.reader import decode_sample, read_shard

SHUFFLE_BUFFER_SAMPLES = 1000
SHUFFLE_INITIAL_SAMPLES = 100

Batch = tuple[torch.Tensor, torch.Tensor | None]



def steps_per_epoch(num_samples: int, batch_size_per_worker: int, world_size: int) -> int:
    """Full global batches in one pass over `num_samples`; `UserError` if not even one."""
    global_batch = batch_size_per_worker * world_size
    steps = num_samples // global_batch
    if steps < 1:
        raise UserError(
            f"{num_samples} training samples are fewer than one global batch "
            f"({world_size} workers x {batch_size_per_worker} = {global_batch}): "
            "lower train.batch_size or train.num_workers"
        )
    return steps


def check_plan(urls: list[str], world_size: int, loader_workers: int) -> None:
    """Refuse, before training starts, a data plan that cannot work.

    Resampling lets any number of shards feed any number of ranks x loader workers, so the
    only failures are no shards, shards that are not there, and nonsensical counts.
    """
    if world_size < 1 or loader_workers < 0:
        raise UserError(f"world size {world_size} / loader workers {loader_workers}: invalid")
    if not urls:
        raise UserError("no training shards: run `dvc repro prepare` (or check train.shards)")
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise UserError(f"shard {missing[0]} does not exist ({len(missing)} missing)")


# --- batches ------------------------------------------------------------------------------------


def _collate(decoded: list[tuple[np.ndarray, int | None]], with_labels: bool) -> Batch:
    """Stack into uint8 (B, C, H, W); the consumer converts on its device (`to_signed`)."""
    pixels = torch.from_numpy(np.stack([image for image, _ in decoded]))
    images = pixels.permute(0, 3, 1, 2).contiguous()
    if not with_labels:
        return images, None
    return images, torch.tensor([label for _, label in decoded], dtype=torch.int64)


def no_samples_message(urls: list[str], seen: Counter[str]) -> str:
    """What to say when a pass over every shard found no png sample."""
    where = str(Path(urls[0]).parent) if urls else "the shards"
    members = ", ".join(sorted(seen)) or "none"
    return f"no shard in {where} holds png samples; members seen: {members}"


# --- training stream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """A UserError raised in a loader worker, carried back as one line (not a traceback)."""

    message: str


class _ResampledBatches(IterableDataset):
    """One rank's batches; each loader worker produces every `num_slots`-th batch.

    Global batch i (0-based, within the epoch) belongs to logical worker i % num_slots and is
    that worker's (i // num_slots)-th batch. DataLoader asks its workers round-robin starting at
    worker 0, so worker slot w plays logical worker (w + skip_batches) % num_slots: the batches
    then arrive in global order from `skip_batches` on. Each iteration is the next epoch:
    `first_epoch` (skipping `first_skip` batches), then first_epoch + 1, ... - every copy of
    the dataset (one per loader process, which lives across epochs) counts for itself.
    """

    def __init__(self, urls: list[str], *, batch_size: int, rank: int, num_batches: int,
                 seed: int, first_epoch: int, first_skip: int, num_slots: int,
                 with_labels: bool):
        super().__init__()
        self.urls = list(urls)
        self.batch_size = batch_size
        self.rank = rank
        self.num_batches = num_batches
        self.seed = seed
        self.first_epoch = first_epoch
        self.first_skip = first_skip
        self.epochs_started = 0
        self.num_slots = num_slots
        self.with_labels = with_labels

    def _samples(self, rng: random.Random) -> Iterator[tuple[str, dict]]:
        while True:  # resampled: cycle forever, every shard once per cycle, fresh order
            order = self.urls[:]
            rng.shuffle(order)
            seen: Counter[str] = Counter()
            yielded = False
            for url in order:
                for sample in read_shard(url, seen):
                    yielded = True
                    yield url, sample
            if not yielded:
                raise UserError(no_samples_message(self.urls, seen))

    def _shuffled(self, rng: random.Random) -> Iterator[tuple[str, dict]]:
        # As webdataset.shuffle: start after a small fill, grow the buffer to its full size.
        samples = self._samples(rng)
        buffer = [next(samples) for _ in range(SHUFFLE_INITIAL_SAMPLES)]
        for incoming in samples:
            if len(buffer) < SHUFFLE_BUFFER_SAMPLES:
                buffer.append(incoming)
                incoming = next(samples)
            pick = rng.randrange(len(buffer))
            yield buffer[pick]
            buffer[pick] = incoming

    def __iter__(self) -> Iterator[Batch | _Failure]:
        epoch = self.first_epoch + self.epochs_started
        skip_batches = self.first_skip if self.epochs_started == 0 else 0
        self.epochs_started += 1
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + skip_batches) % self.num_slots
        return self._batches(epoch, skip_batches, worker)

    def _batches(self, epoch: int, skip_batches: int, worker: int) -> Iterator[Batch | _Failure]:
        # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}/{self.num_slots}")
        mine = range(worker, self.num_batches, self.num_slots)
        try:
            stream = self._shuffled(rng)
            for batch_index in mine:
                raw = [next(stream) for _ in range(self.batch_size)]
                if batch_index < skip_batches:
                    continue  # drawn (to keep the stream in step) but not decoded
                decoded = [decode_sample(s, url, self.with_labels) for url, s in raw]
                yield _collate(decoded, self.with_labels)
        except UserError as err:
            yield _Failure(str(err))


class EpochLoader:
    """One rank's training batches, epoch by epoch: `loader(epoch, skip_batches=0)` yields
    exactly `num_batches - skip_batches` shuffled batches of that epoch.

    Images are uint8 (B, C, H, W); labels int64 (B,) or None. Deterministic for
    (seed, rank, epoch, loader_workers); batches differ between ranks and epochs. Asked for
    consecutive epochs, as training does, the `loader_workers` processes start once and serve
    them all; any other epoch, or `persistent=False`, starts fresh ones. `pin_memory` pins
    batches for an asynchronous copy to a GPU.
    """

    def __init__(
        self, urls: list[str], *, batch_size: int, rank: int, world_size: int,
        num_batches: int, seed: int, loader_workers: int = 0, with_labels: bool = False,
        pin_memory: bool = False, persistent: bool = True,
    ) -> None:
        check_plan(urls, world_size, loader_workers)
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.num_batches = num_batches
        self._dataset_args = {
            "urls": urls, "batch_size": batch_size, "rank": rank, "num_batches": num_batches,
            "seed": seed, "num_slots": max(loader_workers, 1), "with_labels": with_labels,
        }
        self._loader_args = {
            "batch_size": None, "num_workers": loader_workers, "pin_memory": pin_memory,
            "persistent_workers": persistent and loader_workers > 0,
        }
        # Only loader processes that live on (or none: the dataset counts in this process)
        # carry their epoch count over to the next call.
        self._counts_epochs = persistent or loader_workers == 0
        self._batches: Iterable | None = None  # what yields the next epoch, when one is running
        self._next_epoch: int | None = None

    def __call__(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        if not 0 <= skip_batches <= self.num_batches:
            raise UserError(f"skip_batches {skip_batches} is outside 0..{self.num_batches}")
        continues = self._counts_epochs and (epoch, skip_batches) == (self._next_epoch, 0)
        if self._batches is None or not continues:
            dataset = _ResampledBatches(
                **self._dataset_args, first_epoch=epoch, first_skip=skip_batches
            )
            workers = self._loader_args["num_workers"]
            self._batches = DataLoader(dataset, **self._loader_args) if workers else dataset
        self._next_epoch = epoch + 1
        return _checked(iter(self._batches), self.num_batches - skip_batches)


def _checked(batches: Iterator[Batch | _Failure], expected: int) -> Iterator[Batch]:
    """Re-raise a loader worker's UserError as one line; refuse a short epoch."""
    produced, failure = 0, None
    for item in batches:
        if isinstance(item, _Failure):
            failure = item.message
            break
        produced += 1
        yield item
    if failure is not None:
        # Its last reference: a one-epoch loader's processes end now. Kept alive by the
        # traceback, they would end at a later garbage collection, which waits 5 s for them
        # (measured; torch's worker join times out).
        del batches
        raise UserError(failure)
    if produced != expected:  # a broken promise would hang DDP: say so
        raise RuntimeError(f"loader gave {produced} batches, expected {expected}")


def train_batches(
    urls: list[str], *, batch_size: int, rank: int, world_size: int, num_batches: int,
    seed: int, epoch: int, skip_batches: int = 0, loader_workers: int = 0,
    with_labels: bool = False,
) -> Iterator[Batch]:
    """One epoch of `EpochLoader` (its loader processes end with it): exactly
    `num_batches - skip_batches` shuffled batches for `rank` in `epoch`."""
    loader = EpochLoader(
        urls, batch_size=batch_size, rank=rank, world_size=world_size, num_batches=num_batches,
        seed=seed, loader_workers=loader_workers, with_labels=with_labels, persistent=False,
    )
    yield from loader(epoch, skip_batches)


def iter_split(
    urls: list[str], *, batch_size: int, with_labels: bool = False, limit: int | None = None
) -> Iterator[Batch]:
    """Every sample once (or the first `limit`), in shard order, unshuffled; last batch partial."""
    if not urls:
        raise UserError("no shards to read: run `dvc repro prepare`")
    pending: list[tuple[np.ndarray, int | None]] = []
    seen = 0
    for url in urls:
        for sample in read_shard(url):
            if limit is not None and seen >= limit:
                break
            pending.append(decode_sample(sample, url, with_labels))
            seen += 1
            if len(pending) == batch_size:
                yield _collate(pending, with_labels)
                pending = []
        if limit is not None and seen >= limit:
            break
    if pending:
        yield _collate(pending, with_labels)
