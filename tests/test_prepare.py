"""The `prepare` stage: real DVC runs on mnist5k, a folder of mixed images, archives, bad files."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_repo, stage_env
from PIL import Image

from pipeline.core.config import DataConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.data.prepare import prepare_dataset, split_assignments
from pipeline.data.reader import read_shard

IMAGE_SIZE = 16


def file_digests(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                           p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def shard_bytes(repo: Path) -> dict[str, str]:
    return {n: h for n, (h, _) in file_digests(repo / "data" / "shards").items()}


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["dvc", *args], cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_dvc_repro_prepare_mnist5k(tmp_path, mnist_shards):
    repo = copy_repo(tmp_path / "repo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "repro", "prepare")

    stats = json.loads((repo / "data/stats.json").read_text())
    assert stats["splits"]["train"]["samples"] == 4500
    assert stats["splits"]["val"]["samples"] == 500
    assert stats["labelled"] and stats["num_classes"] == 10
    # stratified: every digit keeps its 9:1 share
    for digit, n_val in stats["splits"]["val"]["classes"].items():
        assert n_val * 9 == pytest.approx(stats["splits"]["train"]["classes"][digit], abs=9)
    manifest = pd.read_parquet(repo / "data/manifest.parquet")
    assert len(manifest) == 5000 and manifest["key"].is_unique
    assert manifest["split"].value_counts().to_dict() == {"train": 4500, "val": 500}
    assert sorted(p.name for p in (repo / "data/shards").iterdir()) == [
        *(f"train-{i:06d}.tar" for i in range(5)), "val-000000.tar"
    ]

    before = file_digests(repo / "data")
    lock_before = (repo / "dvc.lock").read_text()
    second = dvc(repo, "repro", "prepare")
    assert "up to date" in second.stdout, second.stdout
    assert file_digests(repo / "data") == before
    assert (repo / "dvc.lock").read_text() == lock_before

    first_shards = shard_bytes(repo)
    dvc(repo, "repro", "--force", "prepare")
    assert shard_bytes(repo) == first_shards
    # and an independent run in another directory, at another time, by the fixture
    assert shard_bytes(mnist_shards) == first_shards
    assert (repo / "dvc.lock").read_text() == lock_before


def test_split_is_exact_stratified_and_seeded():
    labels = ["a"] * 7 + ["b"] * 13 + ["c"] * 5
    split = split_assignments(labels, 0.2, seed=3)
    assert len(split["val"]) == 5 and len(split["train"]) == 20
    assert sorted(split["train"] + split["val"]) == list(range(25))
    val_labels = sorted(labels[p] for p in split["val"])
    assert val_labels == ["a", "b", "b", "b", "c"]
    assert split_assignments(labels, 0.2, seed=3) == split
    assert split_assignments(labels, 0.2, seed=4)["val"] != split["val"]


# --- a folder of mixed formats, modes and bad files ---------------------------------------------


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def _solid(mode: str, color, size=(24, 24)) -> Image.Image:
    return Image.new(mode, size, color)


def _exif_rotated_jpeg(path: Path) -> None:
    """64x32 stored, left half black; EXIF orientation 6 says: rotate 90° clockwise to view."""
    image = _solid("RGB", (255, 255, 255), (64, 32))
    image.paste((0, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(path, image, format="JPEG", quality=95, exif=exif.tobytes())


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# name -> expected stored RGB colour at the image centre (None: checked separately)
GOOD = {
    "cats/rgba.png": (255, 255, 255),  # fully transparent red -> white
    "cats/rgb.png": (10, 200, 30),
    "cats/deep/er/lossless.webp": (0, 0, 255),
    "cats/anim.gif": (255, 0, 0),  # first frame red, second blue
    "cats/exif.jpg": None,
    "cats/gray.bmp": (77, 77, 77),
    "dogs/sixteen.tiff": (128, 128, 128),  # I;16 at 32896/65535 -> 128, not clipped to 255
    "dogs/cmyk.tif": (0, 255, 255),  # cyan
    "dogs/la.png": (255, 255, 255),  # transparent black -> white
    "dogs/palette.png": (255, 255, 0),
    "dogs/wide.png": (40, 40, 40),
    "dogs/a/b/c/nested.jpeg": (128, 128, 128),
}
BAD = {
    "cats/zero.png": "zero_bytes",
    "cats/half.png": "truncated",
    "dogs/half.jpg": "truncated",
    "dogs/text.png": "not_an_image",
    "dogs/tiny.png": "too_small",
}


def make_folder(root: Path) -> Path:
    """The folder fixture: two classes, nested dirs, every format and mode, each bad kind."""
    _save(root / "cats/rgba.png", _solid("RGBA", (255, 0, 0, 0)))
    _save(root / "cats/rgb.png", _solid("RGB", (10, 200, 30), (30, 20)))
    _save(root / "cats/deep/er/lossless.webp", _solid("RGB", (0, 0, 255)), lossless=True)
    frames = [_solid("P", 0), _solid("P", 1)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    _save(root / "cats/anim.gif", frames[0], save_all=True, append_images=frames[1:])
    _exif_rotated_jpeg(root / "cats/exif.jpg")
    _save(root / "cats/gray.bmp", _solid("L", 77))
    sixteen = Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16))
    assert sixteen.mode == "I;16"
    _save(root / "dogs/sixteen.tiff", sixteen)
    _save(root / "dogs/cmyk.tif", _solid("CMYK", (255, 0, 0, 0)))
    _save(root / "dogs/la.png", _solid("LA", (0, 0)))
    palette = _solid("P", 0)
    palette.putpalette([255, 255, 0] + [0] * 765)
    _save(root / "dogs/palette.png", palette)
    _save(root / "dogs/wide.png", _solid("L", 40, (200, 12)))
    _save(root / "dogs/a/b/c/nested.jpeg", _solid("L", 128), quality=100)
    # bad files
    (root / "cats/zero.png").write_bytes(b"")
    png = _encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                         dtype=np.uint8)), "PNG")
    (root / "cats/half.png").write_bytes(png[: len(png) // 2])
    jpeg = _encoded(_solid("RGB", (1, 2, 3), (64, 64)), "JPEG")
    (root / "dogs/half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dogs/text.png").write_text("not a picture\n")
    _save(root / "dogs/tiny.png", _solid("L", 0, (6, 30)))
    (root / "dogs/notes.txt").write_text("ignored: no image extension\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder") / "images")


def data_cfg(source: Path, **overrides) -> DataConfig:
    options = {"image_size": IMAGE_SIZE, "channels": 3, "val_fraction": 0.25,
               "samples_per_shard": 4, "num_processes": 1, "min_side_px": 8, "backend": "local"}
    return DataConfig(source=str(source), **{**options, **overrides})


def stored_pngs(root: Path) -> dict[str, bytes]:
    """key -> stored PNG bytes, read back from every shard."""
    return {
        sample["__key__"]: sample["png"]
        for shard in sorted((root / "data/shards").glob("*.tar"))
        for sample in read_shard(str(shard))
    }


def stored_images(root: Path) -> dict[str, Image.Image]:
    return {key: Image.open(io.BytesIO(png)) for key, png in stored_pngs(root).items()}


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_out")
    stats = prepare_dataset(data_cfg(folder, num_processes=2), Layout(out)).to_dict()
    return out, stats


def test_folder_samples_land_in_shards(folder_run):
    out, stats = folder_run
    manifest = pd.read_parquet(out / "data/manifest.parquet")
    assert sorted(manifest["source_path"]) == sorted(GOOD)
    assert stats["class_names"] == ["cats", "dogs"] and stats["labelled"]
    expected_labels = {name: 0 if name.startswith("cats/") else 1 for name in GOOD}
    assert dict(zip(manifest["source_path"], manifest["label"], strict=True)) == expected_labels
    assert stats["splits"]["train"]["samples"] + stats["splits"]["val"]["samples"] == len(GOOD)
    # The split is decided from the listing, before decoding: round(17 * 0.25) = 4 of the 17
    # listed files are val, 2 of them bad; 13 train in shards of 4 (fewer where a file was bad).
    assert stats["splits"]["val"]["samples"] == 2
    assert stats["shards"] == 4 + 1

    images = stored_images(out)
    assert len(images) == len(GOOD)
    by_name = dict(zip(manifest["source_path"], manifest["key"], strict=True))
    for name, colour in GOOD.items():
        image = images[by_name[name]]
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))
        if colour is not None:
            centre = np.asarray(image)[IMAGE_SIZE // 2, IMAGE_SIZE // 2]
            assert np.abs(centre.astype(int) - colour).max() <= 3, (name, centre)
    row = manifest.set_index("source_path").loc["cats/exif.jpg"]
    assert (row["width"], row["height"]) == (32, 64)  # as displayed, after EXIF rotation
    exif = np.asarray(images[by_name["cats/exif.jpg"]].convert("L"), dtype=int)
    assert exif[:4].mean() < 40 and exif[-4:].mean() > 215  # black on top once rotated
    digests = {k: hashlib.sha256(png).hexdigest() for k, png in stored_pngs(out).items()}
    assert digests == dict(zip(manifest["key"], manifest["sha256"], strict=True))


def test_folder_bad_files_counted_by_reason(folder_run, folder):
    _, stats = folder_run
    for reason in {*BAD.values(), "corrupt", "unreadable", "too_large"}:
        expected = sorted(str(folder / n) for n, r in BAD.items() if r == reason)
        assert sorted(stats["skipped"][reason]["paths"]) == expected, reason
        assert stats["skipped"][reason]["count"] == len(expected)
    assert stats["skipped_total"] == len(BAD)
    assert stats["ignored_files"] == {"count": 1, "paths": ["dogs/notes.txt"]}


def test_folder_grayscale_and_pixel_stats(folder, tmp_path):
    cfg = data_cfg(folder, channels=1, val_fraction=0.0)
    stats = prepare_dataset(cfg, Layout(tmp_path)).to_dict()
    images = stored_images(tmp_path)
    assert {image.mode for image in images.values()} == {"L"}
    assert stats["splits"]["val"]["samples"] == 0
    pixels = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images.values()])
    assert stats["pixel_mean"] == pytest.approx([pixels.mean()], abs=1e-5)
    assert stats["pixel_std"] == pytest.approx([pixels.std()], abs=1e-5)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz", ".tar"])
def test_archive_read_in_place_matches_folder(folder, folder_run, tmp_path, suffix):
    archive = tmp_path / f"images{suffix}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:  # wrapped in one top folder, as zips of a folder usually are
                zf.write(p, f"images/{p.relative_to(folder).as_posix()}")
    else:
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tf:
            tf.add(folder, arcname="images")
    out = tmp_path / "out"
    out.mkdir()
    before = {p for p in tmp_path.rglob("*")}
    stats = prepare_dataset(data_cfg(archive), Layout(out)).to_dict()
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents for p in written)  # nothing extracted next to the archive

    columns = ["key", "split", "label", "source_path", "sha256", "width", "height"]
    from_folder = pd.read_parquet(folder_run[0] / "data/manifest.parquet")[columns]
    from_archive = pd.read_parquet(out / "data/manifest.parquet")[columns]
    pd.testing.assert_frame_equal(from_archive, from_folder)
    assert shard_bytes(out) == shard_bytes(folder_run[0])
    assert {r: v["count"] for r, v in stats["skipped"].items()} == {
        r: v["count"] for r, v in folder_run[1]["skipped"].items()
    }
    assert f"{archive}!cats/zero.png" in stats["skipped"]["zero_bytes"]["paths"]


def test_unlabelled_when_images_sit_at_the_top(tmp_path):
    for i in range(3):
        _save(tmp_path / "src" / f"{i}.png", _solid("L", i * 50))
    _save(tmp_path / "src" / "sub" / "x.png", _solid("L", 9))
    cfg = data_cfg(tmp_path / "src", val_fraction=0.5)
    stats = prepare_dataset(cfg, Layout(tmp_path)).to_dict()
    assert not stats["labelled"] and stats["num_classes"] is None
    shard = sorted((tmp_path / "data/shards").glob("train-*.tar"))[0]
    assert all("cls" not in s for s in read_shard(str(shard)))


def test_no_valid_image_is_a_user_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"")
    (tmp_path / "src" / "b.jpg").write_text("text")
    with pytest.raises(UserError, match=r"no valid image among 2 \(1 not_an_image, 1 zero_bytes\)"):
        prepare_dataset(data_cfg(tmp_path / "src"), Layout(tmp_path))
    assert not (tmp_path / "data" / "stats.json").exists()


# --- the stage as a user runs it ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_repo(tmp_path_factory, folder):
    repo = copy_repo(tmp_path_factory.mktemp("stage") / "repo")
    shutil.copytree(folder, repo / "images")
    (repo / "empty").mkdir()
    (repo / "empty/readme.md").write_text("no images here\n")
    (repo / "data").mkdir()
    (repo / "data/stats.json").write_text('{"from": "an earlier run"}\n')
    return repo


def run_prepare(repo: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [arg for o in overrides for arg in ("-S", o)]
    return subprocess.run(
        [sys.executable, "stages/prepare.py", *args],
        cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=300,
    )


def test_on_bad_image_error_stops_with_path_and_reason(stage_repo):
    result = run_prepare(stage_repo, "data.source=images", "data.on_bad_image=error",
                         "data.num_processes=1", "data.image_size=16")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    # the first bad file in sorted order
    assert last.startswith("error: images/cats/half.png: bad image, truncated"), last
    assert (stage_repo / "data/stats.json").read_text() == '{"from": "an earlier run"}\n'
    assert not (stage_repo / "data/shards").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing_dir", "error: data.source missing_dir: no such directory or archive"),
        ("params.yaml", "error: data.source params.yaml: expected a directory"),
        ("empty", "error: data.source empty: no images found"),
    ],
)
def test_bad_source_is_one_line(stage_repo, source, message):
    result = run_prepare(stage_repo, f"data.source={source}")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert (stage_repo / "data/stats.json").read_text() == '{"from": "an earlier run"}\n'


# --- hostile sources: nothing extracted, everything counted --------------------------------------


def _png_bytes(size: tuple[int, int], value: int = 90) -> bytes:
    buffer = io.BytesIO()
    _solid("L", value, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_archive_members_named_outside_it_are_counted_and_never_written(tmp_path):
    archive = tmp_path / "in" / "images.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(4):
            zf.writestr(f"cats/{i}.png", _png_bytes((16, 16), i * 40))
        zf.writestr("../escaped.png", _png_bytes((16, 16)))
        zf.writestr("/abs.png", _png_bytes((16, 16)))
    out = tmp_path / "out"
    stats = prepare_dataset(data_cfg(archive), Layout(out)).to_dict()
    assert stats["samples"] == 4
    assert stats["skipped"]["unsafe_name"]["count"] == 2
    assert sorted(stats["skipped"]["unsafe_name"]["paths"]) == [
        f"{archive}!../escaped.png", f"{archive}!/abs.png"
    ]
    assert not (tmp_path / "escaped.png").exists() and not Path("/abs.png").exists()
    with pytest.raises(UserError, match=r"escaped\.png: bad image, unsafe_name"):
        prepare_dataset(data_cfg(archive, on_bad_image="error"), Layout(tmp_path / "strict"))


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_members_that_expand_past_the_limit_are_skipped_unread(tmp_path, monkeypatch,
                                                                        suffix):
    from pipeline.data import images

    monkeypatch.setattr(images, "MAX_SOURCE_BYTES", 4096)
    big = _png_bytes((16, 16)) + b"\0" * 100_000  # compresses to little, expands past 4 KiB
    small = {f"{kind}/{i}.png": _png_bytes((16, 16), i * 50)
             for i, kind in enumerate(("cats", "dogs", "dogs"))}
    archive = tmp_path / f"images{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, body in {**small, "dogs/bomb.png": big}.items():
                zf.writestr(name, body)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name, body in {**small, "dogs/bomb.png": big}.items():
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    assert archive.stat().st_size < 4096 * 2
    stats = prepare_dataset(data_cfg(archive), Layout(tmp_path / "out")).to_dict()
    assert stats["samples"] == 3
    assert stats["skipped"]["too_large"]["paths"] == [f"{archive}!dogs/bomb.png"]


def test_a_decompression_bomb_is_too_large_not_decoded(tmp_path, monkeypatch):
    """PIL's pixel limit (lowered here, as a huge image would exceed the default one)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _save(tmp_path / "src/a/small.png", _solid("L", 10, (16, 16)))
    _save(tmp_path / "src/b/small.png", _solid("L", 200, (16, 16)))
    _save(tmp_path / "src/b/bomb.png", _solid("L", 90, (64, 64)))
    stats = prepare_dataset(data_cfg(tmp_path / "src"), Layout(tmp_path / "out")).to_dict()
    assert stats["samples"] == 2
    assert stats["skipped"]["too_large"]["paths"] == [str(tmp_path / "src/b/bomb.png")]
