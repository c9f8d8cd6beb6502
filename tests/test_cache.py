"""The decoded-split cache: every sample once per epoch across ranks, equal steps, exact
resume, and the choice between device, host and streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.data.cache import (
    CachedBatches,
    PinnedStaging,
    choose_cache,
    decode_process_count,
    decode_split,
    epoch_permutation,
    training_batches,
)
from pipeline.data.images import encode_png
from pipeline.data.loader import EpochLoader
from pipeline.data.prepare import sample_key, write_shard
from pipeline.data.reader import shard_urls

SIDE_PX = 8
CPU = torch.device("cpu")


def make_shards(folder: Path, sizes: list[int]) -> tuple[list[str], np.ndarray]:
    """Shards of distinct random images; returns (urls, uint8 (N, 1, H, W) in order)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pixels, index = [], 0
    for number, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            array = rng.integers(0, 256, (SIDE_PX, SIDE_PX), dtype=np.uint8)
            samples.append({"__key__": sample_key(index), "png": encode_png(Image.fromarray(array)),
                            "cls": str(index % 10).encode()})
            pixels.append(array[None])
            index += 1
        write_shard(folder / f"train-{number:06d}.tar", samples)
    return shard_urls("train", str(folder)), np.stack(pixels)


def test_decode_split_keeps_shard_order_in_one_or_several_processes(tmp_path):
    urls, expected = make_shards(tmp_path, [5, 3, 6])
    pixels, labels = decode_split(urls, with_labels=True)
    assert pixels.dtype == torch.uint8 and pixels.shape == (14, 1, SIDE_PX, SIDE_PX)
    np.testing.assert_array_equal(pixels.numpy(), expected)
    assert labels.tolist() == [i % 10 for i in range(14)]
    in_pool, _ = decode_split(urls, num_processes=2)
    assert torch.equal(in_pool, pixels)


@pytest.mark.parametrize(("samples", "most", "processes"), [
    (4_500, 2, 1),  # mnist5k's train split: one process decodes it before a pool has started
    (39_999, 8, 1), (40_000, 8, 2), (200_000, 8, 8), (200_000, 1, 1), (0, 4, 1)])
def test_a_split_gets_a_decode_process_per_20000_samples_up_to_the_workers_cpus(samples, most,
                                                                             processes):
    assert decode_process_count(samples, most) == processes


@pytest.mark.parametrize(("samples", "world_size", "batch_size"), [(24, 2, 4), (25, 3, 2)])
def test_every_sample_at_most_once_per_epoch_disjoint_ranks_equal_steps(samples, world_size,
                                                                          batch_size):
    pixels = torch.arange(samples, dtype=torch.int64).view(samples, 1, 1, 1)  # value = index
    steps = samples // (batch_size * world_size)
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            batches = list(CachedBatches(pixels, None, batch_size=batch_size, rank=rank,
                                         world_size=world_size, num_batches=steps, seed=3,
                                         device=CPU, on_device=False)(epoch))
            assert len(batches) == steps
            assert all(images.shape == (batch_size, 1, 1, 1) for images, _ in batches)
            seen += [int(v) for images, _ in batches for v in images.flatten()]
        assert len(seen) == len(set(seen)) == steps * batch_size * world_size
        if samples % (batch_size * world_size) == 0:
            assert sorted(seen) == list(range(samples))  # every sample, exactly once
    first, second = epoch_permutation(samples, 3, 0), epoch_permutation(samples, 3, 1)
    assert not torch.equal(first, second)
    assert torch.equal(first, epoch_permutation(samples, 3, 0))


def test_a_resumed_epoch_continues_with_the_same_batches():
    pixels = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    source = CachedBatches(pixels, None, batch_size=4, rank=1, world_size=2, num_batches=5,
                           seed=0, device=CPU, on_device=True)
    full = list(source(2))
    for skip in (0, 3, 5):
        resumed = list(source(2, skip))
        assert len(resumed) == 5 - skip
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, full[skip:], strict=True))
    with pytest.raises(UserError, match="skip_batches 6"):
        list(source(2, 6))


def test_the_host_cache_gathers_into_a_ring_of_reused_staging_buffers():
    """The GPU host cache's staging (here without streams): each batch is the plain gather's
    rows, written into one of three buffers in turn (no per-batch allocation, nothing pinned
    twice), and a short last batch uses the front of its buffer."""
    pixels = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    staging = PinnedStaging((8, 1, 4, 4), torch.device("cpu"))
    order = epoch_permutation(50, seed=0, epoch=0)
    addresses = []
    for batch in range(7):
        index = order[batch * 8 : (batch + 1) * 8]
        images, copied = staging.fetch(pixels, index)
        assert copied is None and torch.equal(images, pixels.index_select(0, index))
        addresses.append(images.data_ptr())
    assert addresses == [buffer.data_ptr() for buffer in staging.buffers] * 2 + [
        staging.buffers[0].data_ptr()]
    assert len(images) == 2  # 50 = 6 x 8 + 2


def test_too_many_steps_for_the_split_are_refused():
    with pytest.raises(UserError, match="need 48 samples, the split has 40"):
        CachedBatches(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), None, batch_size=8, rank=0,
                      world_size=2, num_batches=3, seed=0, device=CPU, on_device=False)


def test_auto_picks_host_when_it_fits_and_stream_when_the_budget_is_too_small():
    mib = 2**20
    assert choose_cache("auto", 100 * mib, CPU, host_bytes=1000 * mib).mode == "host"
    small = choose_cache("auto", 100 * mib, CPU, host_bytes=150 * mib)
    assert small.mode == "stream" and "fits neither" in small.reason
    gpu = torch.device("cuda", 0)
    assert choose_cache("auto", 100 * mib, gpu, 10**12, device_bytes=1000 * mib).mode == "device"
    assert choose_cache("auto", 100 * mib, gpu, 10**12, device_bytes=200 * mib).mode == "host"
    assert choose_cache("device", 100 * mib, CPU).mode == "host"  # no GPU: host is the device
    assert choose_cache("stream", 1, CPU).mode == "stream"


def test_training_batches_follow_the_choice(tmp_path):
    urls, expected = make_shards(tmp_path, [6, 6])
    options = {"split_shape": (12, 1, SIDE_PX, SIDE_PX), "batch_size": 3, "rank": 0,
               "world_size": 2, "num_batches": 2, "seed": 0, "device": CPU,
               "decode_processes": 1, "loader_workers": 0}
    cached = training_batches(urls, cache="auto", **options)
    assert isinstance(cached, CachedBatches)
    images = torch.cat([images for images, _ in cached(0)])
    known = {row.tobytes() for row in expected}
    assert images.dtype == torch.uint8 and all(row.numpy().tobytes() in known for row in images)
    assert isinstance(training_batches(urls, cache="stream", **options), EpochLoader)
    # With labels (the classifier stage): each image keeps its own, cached or streamed.
    label_of = {row.tobytes(): index % 10 for index, row in enumerate(expected)}
    for cache in ("host", "stream"):
        source = training_batches(urls, cache=cache, with_labels=True, **options)
        for images, labels in source(0):
            assert [label_of[row.numpy().tobytes()] for row in images] == labels.tolist()
