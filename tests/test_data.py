"""The shard loader: exact round trip, equal batches per rank, resume, bad and hostile shards."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import DatasetStats
from pipeline.data.images import encode_png
from pipeline.data.loader import EpochLoader, check_plan, iter_split, steps_per_epoch, train_batches
from pipeline.data.pixels import to_signed
from pipeline.data.prepare import sample_key, write_shard
from pipeline.data.reader import read_shard, shard_urls

SIDE_PX = 8


def make_shards(folder: Path, sizes: list[int], *, channels: int = 1, seed: int = 0,
                split: str = "train") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shards of random images; returns (urls, uint8 pixels (N, C, H, W), labels) in order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels, labels, urls, index = [], [], [], 0
    for number, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            shape = (SIDE_PX, SIDE_PX) if channels == 1 else (SIDE_PX, SIDE_PX, 3)
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            label = int(rng.integers(0, 10))
            samples.append({"__key__": sample_key(index), "png": encode_png(Image.fromarray(array)),
                            "cls": str(label).encode(), "json": b"{}"})
            pixels.append(array.reshape(SIDE_PX, SIDE_PX, channels).transpose(2, 0, 1))
            labels.append(label)
            index += 1
        path = folder / f"{split}-{number:06d}.tar"
        write_shard(path, samples)
        urls.append(str(path))
    return urls, np.stack(pixels), np.asarray(labels)


def batches(urls, **kw) -> list:
    options = {"batch_size": 4, "rank": 0, "world_size": 1, "num_batches": 5, "seed": 0,
               "epoch": 0, "with_labels": True}
    return list(train_batches(urls, **{**options, **kw}))


@pytest.mark.parametrize("channels", [1, 3])
def test_images_round_trip_exactly(tmp_path, channels):
    urls, pixels, labels = make_shards(tmp_path, [5, 3, 6], channels=channels)
    got = list(iter_split(urls, batch_size=4, with_labels=True))
    assert [len(images) for images, _ in got] == [4, 4, 4, 2]
    images = torch.cat([b[0] for b in got])
    assert images.dtype == torch.uint8 and images.shape == (14, channels, SIDE_PX, SIDE_PX)
    np.testing.assert_array_equal(images.numpy(), pixels)
    np.testing.assert_array_equal(torch.cat([b[1] for b in got]).numpy(), labels)
    assert [len(b[0]) for b in iter_split(urls, batch_size=4, limit=6)] == [4, 2]


def test_training_batches_hold_source_pixels_and_labels(tmp_path):
    urls, pixels, labels = make_shards(tmp_path, [5, 3, 6])
    known = {pixels[i].tobytes(): labels[i] for i in range(len(labels))}
    for images, batch_labels in batches(urls, loader_workers=1):
        assert batch_labels.dtype == torch.int64
        for image, label in zip(images.numpy(), batch_labels.tolist(), strict=True):
            assert known[image.tobytes()] == label


@pytest.mark.parametrize(
    ("sizes", "world_size", "loader_workers"),
    [
        ([1, 7, 2, 13], 3, 2),  # uneven shards
        ([3], 2, 2),  # one shard for 2 ranks x 2 loader workers
        ([2, 9], 4, 0),
    ],
)
def test_every_rank_gets_the_same_number_of_batches(tmp_path, sizes, world_size, loader_workers):
    urls, _, _ = make_shards(tmp_path, sizes)
    check_plan(urls, world_size, loader_workers)
    per_rank = [
        batches(urls, rank=rank, world_size=world_size, num_batches=6,
                loader_workers=loader_workers)
        for rank in range(world_size)
    ]
    for got in per_rank:
        assert len(got) == 6
        assert all(images.shape == (4, 1, SIDE_PX, SIDE_PX) for images, _ in got)
    if sum(sizes) > 4:  # ranks shuffle differently
        assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_deterministic_and_resumable_mid_epoch(tmp_path, loader_workers):
    urls, _, _ = make_shards(tmp_path, [6, 5, 9])
    full = batches(urls, num_batches=7, loader_workers=loader_workers)
    for skip in (3, 4):
        resumed = batches(urls, num_batches=7, skip_batches=skip, loader_workers=loader_workers)
        assert len(resumed) == 7 - skip
        for (a, la), (b, lb) in zip(resumed, full[skip:], strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    assert batches(urls, num_batches=7, skip_batches=7, loader_workers=loader_workers) == []
    if loader_workers == 0:
        other_epoch = batches(urls, num_batches=7, epoch=1)
        assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(full, other_epoch, strict=True))


@pytest.mark.parametrize(("loader_workers", "persistent"), [(0, True), (2, True), (2, False)])
def test_epoch_loader_keeps_its_processes_and_gives_each_epochs_batches(tmp_path,
                                                                        loader_workers,
                                                                        persistent):
    """Training's order of calls: a resumed first epoch, then the next ones; then a jump back
    (a new loader) and an abandoned epoch. Every epoch equals a fresh one-epoch loader's."""
    urls, _, _ = make_shards(tmp_path, [6, 5, 9])
    options = {"batch_size": 4, "rank": 0, "world_size": 1, "num_batches": 5, "seed": 0,
               "with_labels": True, "loader_workers": loader_workers}
    loader = EpochLoader(urls, **options, persistent=persistent)
    worker_pids = []
    for epoch, skip in ((2, 3), (3, 0), (4, 0), (1, 2)):
        got = list(loader(epoch, skip))
        expected = list(train_batches(urls, epoch=epoch, skip_batches=skip, **options))
        assert len(got) == 5 - skip
        for (a, la), (b, lb) in zip(got, expected, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
        if loader_workers and persistent:
            worker_pids.append({w.pid for w in loader._batches._iterator._workers})
    if worker_pids:  # the same processes served epochs 2-4; going back to 1 started new ones
        assert worker_pids[0] == worker_pids[1] == worker_pids[2] != worker_pids[3]
    abandoned = loader(2)
    next(abandoned)
    (first, _), *_ = loader(3)
    assert torch.equal(first, next(iter(train_batches(urls, epoch=3, **options)))[0])


class _CreatesFile:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_members_are_never_unpickled(tmp_path):
    markers = {ext: tmp_path / f"pwned_by_{ext}" for ext in ("pyd", "pkl", "pth")}
    sample = {"__key__": sample_key(0), "cls": b"3",
              "png": encode_png(Image.fromarray(np.zeros((SIDE_PX, SIDE_PX), np.uint8)))}
    sample.update({ext: pickle.dumps(_CreatesFile(path)) for ext, path in markers.items()})
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, [sample])

    # Control: WebDataset's default decoders do run the payloads (pkl, then pth via torch.load,
    # which then fails on the bad magic number), so this test can fail.
    with pytest.raises(wds.DecodingError):
        list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    assert markers["pkl"].exists() and markers["pth"].exists()
    for path in markers.values():
        path.unlink(missing_ok=True)

    assert [set(s) for s in read_shard(str(shard))] == [{"__key__", "__url__", "png", "cls"}]
    (_, labels), = iter_split([str(shard)], batch_size=2, with_labels=True)
    assert labels.tolist() == [3]
    assert len(batches([str(shard)], num_batches=2, loader_workers=1)) == 2
    assert not any(path.exists() for path in markers.values())


def _member_end_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [m.offset_data + (m.size + 511) // 512 * 512 for m in tar.getmembers()]


def test_reads_what_webdataset_reads(tmp_path):
    """Our header walk and webdataset agree, on our shards and on webdataset's TarWriter's."""
    urls, _, _ = make_shards(tmp_path / "ours", [6])
    theirs = tmp_path / "theirs.tar"
    with wds.TarWriter(str(theirs)) as writer:
        for sample in read_shard(urls[0]):
            writer.write({"__key__": sample["__key__"], "png": sample["png"],
                          "cls": sample["cls"], "txt": b"ignored"})
    for url in (urls[0], str(theirs)):
        expected = [{k: s[k] for k in ("__key__", "png", "cls")}
                    for s in wds.WebDataset(url, shardshuffle=False)]
        got = [{k: s[k] for k in ("__key__", "png", "cls")} for s in read_shard(url)]
        assert got == expected and len(got) == 6


def test_corrupt_member_header_is_a_clear_error(tmp_path):
    urls, _, _ = make_shards(tmp_path, [4])
    shard = Path(urls[0])
    data = bytearray(shard.read_bytes())
    data[_member_end_offsets(shard)[2] + 3] ^= 0x01  # a name byte of the 4th member's header
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {shard}: corrupt .*checksum"):
        list(read_shard(str(shard)))


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_member_names_read_as_tarfile_reads_them(tmp_path, tar_format):
    """GNU and pax long-name headers and folder entries (shards from other tools)."""
    shard = tmp_path / "train-000000.tar"
    png = encode_png(Image.fromarray(np.zeros((SIDE_PX, SIDE_PX), np.uint8)))
    key = "d" * 120 + "/" + "é" * 120  # no ustar prefix split fits: an extension header
    with tarfile.open(shard, "w", format=tar_format) as tar:
        folder = tarfile.TarInfo("d" * 120)
        folder.type = tarfile.DIRTYPE  # a member without data, as GNU tar writes for folders
        tar.addfile(folder)
        for ext, body in (("png", png), ("cls", b"7"), ("pyd", b"never read")):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    (sample,) = read_shard(str(shard))
    assert sample["__key__"] == key
    assert (sample["png"], sample["cls"]) == (png, b"7") and "pyd" not in sample


@pytest.mark.parametrize("where", ["mid_member", "member_boundary"])
def test_truncated_shard_is_a_clear_error_naming_it(tmp_path, where):
    urls, _, _ = make_shards(tmp_path, [4, 4])
    shard = Path(urls[1])
    data = shard.read_bytes()
    cut = _member_end_offsets(shard)[5] if where == "member_boundary" else len(data) // 2 + 100
    shard.write_bytes(data[:cut])
    with pytest.raises(UserError, match=f"shard {shard}: truncated") as err:
        list(iter_split(urls, batch_size=2))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"shard {shard}: truncated") as err:
        batches(urls, loader_workers=1)  # raised in a loader process, reported as one line
    assert "\n" not in str(err.value)


def test_plan_checks_and_step_counts(tmp_path):
    assert steps_per_epoch(4500, 32, 2) == 70
    with pytest.raises(UserError, match="fewer than one global batch"):
        steps_per_epoch(60, 16, 4)
    with pytest.raises(UserError, match="no training shards"):
        check_plan([], 2, 1)
    with pytest.raises(UserError, match="does not exist"):
        check_plan([str(tmp_path / "train-000000.tar")], 1, 0)
    with pytest.raises(UserError, match="no val shards in"):
        shard_urls("val", str(tmp_path))
    with pytest.raises(UserError, match="run `dvc repro prepare` first"):
        DatasetStats.load(Layout(tmp_path))


def test_uint8_batches_become_the_float_images_of_before_bit_for_bit():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    before = pixels.float() / 127.5 - 1.0  # what the loader handed out before it sent uint8
    assert torch.equal(to_signed(pixels), before)
    assert to_signed(pixels).min() == -1 and to_signed(pixels).max() == 1


def test_reads_the_prepared_mnist5k(mnist_shards):
    layout = Layout(mnist_shards)
    stats = DatasetStats.load(layout)
    train, val = shard_urls("train", layout.shards()), shard_urls("val", layout.shards())
    assert [Path(u).name for u in train] == [f"train-{i:06d}.tar" for i in range(5)]
    labels = torch.cat([lab for _, lab in iter_split(val, batch_size=128, with_labels=True)])
    counts = np.bincount(labels.numpy(), minlength=10)
    assert counts.tolist() == [stats.splits["val"]["classes"][str(d)] for d in range(10)]
    steps = steps_per_epoch(stats.split_samples("train"), 64, 2)
    images, labels = next(train_batches(train, batch_size=64, rank=1, world_size=2,
                                        num_batches=steps, seed=0, epoch=0, with_labels=True))
    side = stats.image_size
    assert images.shape == (64, stats.channels, side, side) and labels.shape == (64,)
    assert images.min() == 0 and images.max() == 255  # MNIST: black background, white ink
