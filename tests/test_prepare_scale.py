"""`prepare` at scale: the same shards whatever the parallelism (1 process, 2 processes, Ray
tasks on 1 and 2 nodes), a manifest of fsspec URLs, bad images and a lost task on Ray, and peak
memory that does not grow with the number of images."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_prepare import BAD, GOOD, data_cfg, make_folder

from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.data.prepare import (
    FirstBadShard,
    prepare_dataset,
    resolve_backend,
    shard_tasks,
    split_assignments,
)
from pipeline.data.shard_writer import FAULT_ENV, ShardSummary
from pipeline.data.sources import open_source


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("scale_folder") / "images")


def outputs(root: Path) -> dict[str, bytes]:
    """Every output file of a prepare run under `root`, by relative path (stats without the
    source location, which names the run's own folder in skipped paths)."""
    found = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in sorted((root / "data").rglob("*")) if p.is_file()}
    found["data/skipped.tsv"] = b"\n".join(line.split(b"\t")[0] + line.split(b"\t")[1]
                                          for line in found["data/skipped.tsv"].splitlines())
    return found


@pytest.fixture(scope="module")
def one_process(folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_process")
    prepare_dataset(data_cfg(folder), Layout(root))
    return root


def test_two_processes_write_the_same_bytes_as_one(folder, one_process, tmp_path):
    prepare_dataset(data_cfg(folder, num_processes=2), Layout(tmp_path))
    assert outputs(tmp_path) == outputs(one_process)
    assert sorted(p.name for p in (tmp_path / "data/shards").iterdir()) == [
        *(f"train-{i:06d}.tar" for i in range(4)), "val-000000.tar"]


@pytest.mark.parametrize("kind", ["directory", "zip", "tar"])
def test_a_shard_task_carries_its_own_rows_of_the_listing_only(folder, tmp_path, kind):
    """What a decode process or Ray task is sent grows with its shard, not with the listing:
    its rows read the same items as the whole listing does."""
    import shutil

    location = str(folder) if kind == "directory" else shutil.make_archive(
        str(tmp_path / "images"), kind, folder)
    source = open_source(location, scratch=str(tmp_path / "scratch"))
    splits = split_assignments(source.labels, 0.2, 0)
    tasks = list(shard_tasks(source, splits, 3))
    assert sorted(p for task in tasks for p in task.positions) == list(range(len(source.names)))
    with source.reader() as whole:
        for task in tasks:
            assert len(task.rows.names) == len(task.positions) <= 3
            assert not task.rows.ignored and not task.rows.unsafe
            with task.rows.reader() as part:
                for position in task.positions:
                    assert part.item(position) == whole.item(position), (kind, position)


def test_strict_mode_names_the_same_image_whatever_order_the_shards_finish_in():
    verdict = FirstBadShard()
    source = open_source("synthetic:3", scratch="")
    tasks = list(verdict.numbered(shard_tasks(source, {"train": [0, 1, 2], "val": []}, 1)))
    bad_at = {1: (7, "b.png", "truncated", ""), 2: (2, "a.png", "zero_bytes", "")}
    summaries = {n: ShardSummary(task.name, "train", 1, first_bad=bad_at.get(n))
                 for n, task in enumerate(tasks)}
    # The last shard finishes first and holds the lowest listing index: not the verdict yet.
    assert verdict.settled(summaries[2]) is None
    assert verdict.settled(summaries[1]) is None  # shard 0 is still running
    assert verdict.settled(summaries[0]) == bad_at[1]  # the first shard that has a bad image


def test_strict_mode_stops_with_the_same_error_on_one_and_two_processes(folder, tmp_path):
    errors = []
    for processes in (1, 2):
        with pytest.raises(UserError) as caught:
            prepare_dataset(data_cfg(folder, on_bad_image="error", num_processes=processes),
                            Layout(tmp_path / f"p{processes}"))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]


def test_auto_backend_is_ray_only_on_a_cluster():
    assert resolve_backend("auto", {}) == "local"
    assert resolve_backend("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "ray"
    assert resolve_backend("auto", {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}) == "ray"
    assert resolve_backend("local", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "local"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_manifest_of_file_urls_gives_the_folders_samples(folder, one_process, tmp_path,
                                                          suffix):
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                   and p.suffix != ".txt")
    table = pd.DataFrame({"url": [f"file://{folder / n}" for n in names],
                          "label": [n.split("/")[0] for n in names]})
    manifest = tmp_path / f"images{suffix}"
    if suffix == ".csv":
        table.to_csv(manifest, index=False)
    else:
        table.to_parquet(manifest, index=False)
    stats = prepare_dataset(data_cfg(f"file://{manifest}"), Layout(tmp_path / "out")).to_dict()
    assert stats["source_kind"] == "manifest" and stats["class_names"] == ["cats", "dogs"]
    assert stats["samples"] == len(GOOD) and stats["skipped_total"] == len(BAD)
    assert stats["skipped"]["truncated"]["paths"] == [
        f"file://{folder}/cats/half.png", f"file://{folder}/dogs/half.jpg"]
    # Same images, same order, same labels: the same pixels in the shards as the folder's.
    columns = ["key", "split", "label", "sha256"]
    got = pd.read_parquet(tmp_path / "out/data/manifest.parquet")[columns]
    want = pd.read_parquet(one_process / "data/manifest.parquet")[columns]
    pd.testing.assert_frame_equal(got, want)


_RSS = textwrap.dedent("""
    import json, resource, sys
    from pipeline.core.config import DataConfig
    from pipeline.core.layout import Layout
    from pipeline.data.prepare import prepare_dataset
    cfg = DataConfig(source=f"synthetic:{sys.argv[2]}", image_size=16, channels=3,
                     samples_per_shard=500, num_processes=1, backend="local")
    stats = prepare_dataset(cfg, Layout(sys.argv[1]))
    print(json.dumps({"samples": stats.samples,
                      "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def peak_rss(root: Path, images: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _RSS, str(root), str(images)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 11,000 images prepared (~14 s of CPU): the integration tier
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """A generated source of tiny images: 10x the images, about the same peak RSS (the old
    prepare held every prepared image, ~14 KB each)."""
    small, large = peak_rss(tmp_path / "small", 1_000), peak_rss(tmp_path / "large", 10_000)
    assert (small["samples"], large["samples"]) == (1_000, 10_000)
    assert large["rss_kib"] <= 1.2 * small["rss_kib"], (small, large)


# --- on Ray ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_tasks_write_the_same_bytes_and_count_bad_images(ray_cluster, folder, one_process,
                                                            tmp_path):
    stats = prepare_dataset(data_cfg(folder, backend="ray"), Layout(tmp_path)).to_dict()
    assert outputs(tmp_path) == outputs(one_process)
    assert stats["skipped_total"] == len(BAD)  # counted inside the tasks, never fatal


@pytest.mark.slow
def test_a_ray_task_that_dies_is_retried(ray_cluster, folder, one_process, tmp_path,
                                         monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "train-000001.tar")
    prepare_dataset(data_cfg(folder, backend="ray"), Layout(tmp_path))
    assert outputs(tmp_path) == outputs(one_process)
    assert retried_task_attempts(ray_cluster, "write_shard_task"), (
        "the injected fault never fired")


def retried_task_attempts(ray, function: str, timeout_s: float = 60.0) -> list[int]:
    """Attempt numbers above 0 of `function`'s Ray tasks, from the state API of the cluster
    `ray` is connected to (named: other local Rays may run beside it; task events arrive with
    a delay: polled, bounded)."""
    from ray.util.state import list_tasks

    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + timeout_s
    while True:
        attempts = [task.attempt_number for task in list_tasks(
            address=address, filters=[("func_or_class_name", "=", function)], limit=10_000,
            raise_on_missing_output=False) if task.attempt_number > 0]
        if attempts or time.monotonic() > deadline:
            return attempts
        time.sleep(1.0)


_TWO_NODES = textwrap.dedent("""
    import sys
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, "tests")
    from test_prepare import data_cfg
    from pipeline.core.layout import Layout
    from pipeline.data.prepare import prepare_dataset
    # No dashboard: nothing here reads Ray's state API (~4 s of CPU less, measured).
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2, nodes
        prepare_dataset(data_cfg(sys.argv[1], backend="ray"), Layout(sys.argv[2]))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_a_two_node_ray_cluster_writes_the_same_bytes(folder, one_process, tmp_path):
    done = subprocess.run([sys.executable, "-c", _TWO_NODES, str(folder), str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(tmp_path) == outputs(one_process)
