"""Shard reader throughput: the product's streaming tar walk vs the libraries that could replace it.

Sides, each over every train shard of `prepare`, alternating repeat by repeat:
  walk          `pipeline.data.reader.read_shard` (streamed header walk, png/cls only)
  tarfile       Python's `tarfile.open(mode="r|")` stream, the same members kept, grouped by
                webdataset's `group_by_keys` (what the walk would be replaced with)
  webdataset    webdataset's own `tar_file_expander` + `group_by_keys` (every member read)
each twice: reading only (samples/s), and with PNG decode + uint8 batching (`decode_sample`,
batches of 64: the loader's work per sample, one core).

    python -m benchmarks.reader [--repeats 5]
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from benchmarks.common import make_image_folder, make_shards, paired_ratio, print_row, summarise
from pipeline.data.reader import READ_MEMBERS, decode_sample, read_shard, shard_urls

BATCH = 64
Reader = Callable[[str], Iterator[dict]]


def tarfile_reader(url: str) -> Iterator[dict]:
    """The standard library's stream mode, keeping the members the product keeps."""

    def members() -> Iterator[dict]:
        with tarfile.open(url, mode="r|") as archive:
            for member in archive:
                suffix = member.name.rsplit("/", 1)[-1].partition(".")[2].lower()
                if member.isfile() and suffix in READ_MEMBERS:
                    handle = archive.extractfile(member)
                    data = handle.read() if handle else b""
                    yield {"fname": member.name, "data": data, "__url__": url}

    yield from wds.tariterators.group_by_keys(members())


def webdataset_reader(url: str) -> Iterator[dict]:
    """webdataset's own tar iterator (reads and groups every member)."""
    with open(url, "rb") as stream:
        source = [{"url": url, "stream": stream}]
        yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(source))


READERS: dict[str, Reader] = {"walk": read_shard, "tarfile": tarfile_reader,
                              "webdataset": webdataset_reader}


def read_only(reader: Reader, urls: list[str]) -> float:
    started, count = time.perf_counter(), 0
    for url in urls:
        count += sum(1 for _ in reader(url))
    return count / (time.perf_counter() - started)


def read_and_decode(reader: Reader, urls: list[str]) -> float:
    started, count, pending = time.perf_counter(), 0, []
    for url in urls:
        for sample in reader(url):
            pending.append(decode_sample(sample, url, with_labels=True))
            if len(pending) == BATCH:
                np.stack([image for image, _ in pending])
                count += BATCH
                pending = []
    return count / (time.perf_counter() - started)


def measure(urls: list[str], repeats: int, label: str) -> None:
    for work_name, work in (("read", read_only), ("read+decode", read_and_decode)):
        rates: dict[str, list[float]] = {name: [] for name in READERS}
        for _ in range(repeats):
            for name, reader in READERS.items():
                rates[name].append(work(reader, urls))
        for name in READERS:
            print_row(f"{label} {work_name:<12} {name} samples/s", summarise(rates[name]))
        for name in ("tarfile", "webdataset"):
            print_row(f"{label} {work_name:<12} walk / {name}",
                      paired_ratio(rates["walk"], rates[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_reader_") as tmp:
        root = Path(tmp)
        make_shards(root / "mnist", "mnist5k", 32, 1)
        make_image_folder(root / "folder", 3000, 64, 3)
        make_shards(root / "rgb", str(root / "folder"), 64, 3)
        for label, where in (("32x32x1", root / "mnist"), ("64x64x3", root / "rgb")):
            urls = shard_urls("train", str(where / "data" / "shards"))
            measure(urls, args.repeats, label)


if __name__ == "__main__":
    main()

