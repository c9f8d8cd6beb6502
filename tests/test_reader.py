"""The shard reader on hostile input: bounded time and memory, one-line errors, nothing else.

Property-based (hypothesis, derandomized so CI is deterministic): truncations, byte flips and
header-field mutations (size, type flag, name, checksum, pax records, GNU long names) of real
shards must end quickly with samples or a `UserError`. A longer run: `python -m
benchmarks.fuzz_reader`.
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.data import reader
from pipeline.data.images import encode_png
from pipeline.data.loader import train_batches
from pipeline.data.prepare import sample_key, write_shard
from pipeline.data.reader import decode_sample, read_shard

TIME_BOUND_S = 5
# CI: a few hundred fixed examples per property; `benchmarks.fuzz_reader` raises and randomizes.
FUZZ = settings(max_examples=int(os.environ.get("READER_FUZZ_EXAMPLES", "300")), deadline=None,
                derandomize=not os.environ.get("READER_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _png(value: int, side: int = 8) -> bytes:
    return encode_png(Image.fromarray(np.full((side, side), value, np.uint8)))


def _ours() -> bytes:
    """A shard as `prepare` writes it (ustar)."""
    buffer = io.BytesIO()
    samples = [{"__key__": sample_key(i), "png": _png(i * 40), "cls": str(i).encode(),
                "json": b"{}"} for i in range(4)]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in ("cls", "json", "png"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
    return buffer.getvalue()


def _foreign(tar_format: int) -> bytes:
    """Long names in pax or GNU headers, a folder entry: what other tools write."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        folder = tarfile.TarInfo("d" * 110)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(3):
            for ext, body in (("png", _png(i * 60)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{'d' * 110}/{'k' * 100}{i}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


SEEDS = {"ours": _ours(), "pax": _foreign(tarfile.PAX_FORMAT), "gnu": _foreign(tarfile.GNU_FORMAT)}


def _header_offsets(data: bytes) -> list[int]:
    """Offsets of every header block, extension headers included (a raw walk)."""
    offsets, position = [], 0
    while position + 512 <= len(data) and any(data[position : position + 512]):
        offsets.append(position)
        size = int(data[position + 124 : position + 136].split(b"\0")[0].strip() or b"0", 8)
        kind = data[position + 156 : position + 157]
        if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):
            size = 0
        position += 512 + -(-size // 512) * 512
    return offsets


def _fix_checksum(data: bytearray, offset: int) -> None:
    header = data[offset : offset + 512]
    header[148:156] = b" " * 8
    data[offset + 148 : offset + 156] = b"%06o\0 " % sum(header)


@contextmanager
def _time_bound(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"the reader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _read_all(path: Path) -> None:
    """Read and decode every sample; only UserError may escape, within the time bound."""
    with _time_bound(TIME_BOUND_S):
        try:
            for sample in read_shard(str(path)):
                if "png" in sample:
                    decode_sample(sample, str(path), with_labels="cls" in sample)
        except UserError as err:
            assert "\n" not in str(err) and str(path) in str(err)


FIELDS = {  # (start, length) of ustar header fields worth breaking
    "name": (0, 100), "mode": (100, 8), "size": (124, 12), "checksum": (148, 8),
    "type": (156, 1), "magic": (257, 6), "prefix": (345, 155),
}


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), cut=st.floats(0, 1))
def test_fuzz_truncations(tmp_path_factory, seed, cut):
    data = SEEDS[seed]
    path = tmp_path_factory.mktemp("cut") / "train-000000.tar"
    path.write_bytes(data[: int(len(data) * cut)])
    _read_all(path)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_byte_flips(tmp_path_factory, seed, flips):
    data = bytearray(SEEDS[seed])
    for where, value in flips:
        data[min(int(where * len(data)), len(data) - 1)] = value
    path = tmp_path_factory.mktemp("flip") / "train-000000.tar"
    path.write_bytes(bytes(data))
    _read_all(path)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), which=st.integers(0, 100),
       field=st.sampled_from(sorted(FIELDS)), value=st.binary(min_size=1, max_size=24),
       fix_checksum=st.booleans())
def test_fuzz_header_fields(tmp_path_factory, seed, which, field, value, fix_checksum):
    """A header field set to arbitrary bytes (a negative size, a base-256 size, a bad type, a
    name that climbs, ...), with the checksum made valid again so the walk trusts it."""
    data = bytearray(SEEDS[seed])
    offsets = _header_offsets(bytes(data))
    offset = offsets[which % len(offsets)]
    start, length = FIELDS[field]
    data[offset + start : offset + start + length] = value[:length].ljust(length, b"\0")
    if fix_checksum and field != "checksum":
        _fix_checksum(data, offset)
    path = tmp_path_factory.mktemp("field") / "train-000000.tar"
    path.write_bytes(bytes(data))
    _read_all(path)


@FUZZ
@given(records=st.lists(st.tuples(st.sampled_from(["path", "size", "mtime", "x"]),
                                  st.text(max_size=40)), min_size=1, max_size=4),
       length_skew=st.integers(-3, 3))
def test_fuzz_pax_records(tmp_path_factory, records, length_skew):
    """Arbitrary pax extended records (and wrong record lengths) before a png member."""
    body = b""
    for key, value in records:
        record = f" {key}={value}\n".encode()
        length = len(record) + len(str(len(record)))
        body += str(max(length + length_skew, 0)).encode() + record
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(body)
    png = _png(7)
    member = tarfile.TarInfo("00000000.png")
    member.size = len(png)
    buffer = io.BytesIO()
    buffer.write(info.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512))
    buffer.write(member.tobuf(tarfile.USTAR_FORMAT) + png + b"\0" * (-len(png) % 512))
    buffer.write(b"\0" * 1024)
    path = tmp_path_factory.mktemp("pax") / "train-000000.tar"
    path.write_bytes(buffer.getvalue())
    _read_all(path)


# --- the four behaviours, one by one --------------------------------------------------------------


def test_a_negative_size_with_a_valid_checksum_is_an_error_not_a_hang(tmp_path):
    """On a member the reader skips (json), the walk of before returned to this header
    forever: the size moved the offset back by exactly the header block."""
    data = bytearray(SEEDS["ours"])
    json_header = _header_offsets(bytes(data))[1]
    data[json_header + 124 : json_header + 136] = b"-0000001000\0"
    _fix_checksum(data, json_header)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(bytes(data))
    with _time_bound(TIME_BOUND_S), pytest.raises(UserError, match="not an octal number"):
        list(read_shard(str(path)))


def test_shards_without_png_samples_stop_the_stream_and_say_what_they_hold(tmp_path):
    for number in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{number:06d}.tar")) as writer:
            for i in range(3):
                writer.write({"__key__": f"{number}{i:05d}", "jpg": b"\xff\xd8 not ours",
                              "json": b"{}"})
    urls = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    with _time_bound(TIME_BOUND_S), pytest.raises(UserError) as err:
        list(train_batches(urls, batch_size=2, rank=0, world_size=1, num_batches=2, seed=0,
                           epoch=0))
    assert str(err.value) == f"no shard in {tmp_path} holds png samples; members seen: jpg, json"


def test_a_shard_is_streamed_not_read_whole(tmp_path, monkeypatch):
    """A 3 MiB member we skip is never asked for in one read: memory stays bounded."""
    path = tmp_path / "train-000000.tar"
    write_shard(path, [{"__key__": sample_key(0), "png": _png(1), "cls": b"1",
                        "json": b"x" * (3 << 20)}])
    largest = 0
    real_open = reader.fsspec.open

    class Counting(io.RawIOBase):
        def __init__(self, handle):
            self.handle = handle

        def read(self, size=-1):
            nonlocal largest
            largest = max(largest, size if size >= 0 else path.stat().st_size)
            return self.handle.read(size)

    @contextmanager
    def counting_open(url, mode="rb"):
        with real_open(url, mode) as handle:
            yield Counting(handle)

    monkeypatch.setattr(reader.fsspec, "open", counting_open)
    (sample,) = read_shard(str(path))
    assert sample["cls"] == b"1"
    assert 0 < largest <= 1 << 20


@pytest.mark.parametrize("name", ["../../x.png", "/etc/x.png", "a/../../x.png"])
def test_member_names_that_leave_the_shard_are_refused(tmp_path, name):
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        body = _png(3)
        info = tarfile.TarInfo(name)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    with pytest.raises(UserError, match="a path outside the shard"):
        list(read_shard(str(path)))
