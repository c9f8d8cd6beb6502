"""The train stage on a real 2-node Ray cluster, submitted the way a user does it:
`ray job submit --working-dir <repo> -- python stages/train.py ...`.

The two nodes are `ray start --block` processes in their own process groups with their own
temp dirs, so that they are stopped by killing those groups: `ray stop` would also kill the
session's other local Ray cluster (the `ray_cluster` fixture). One CPU per node and two
training workers: the workers can only run on different nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import VENV_BIN, copy_repo, wait_for_http

from devtools.gloo import free_port

RAY = str(VENV_BIN / "ray")
STOP_GRACE_S = 15.0


def _cluster_env() -> dict[str, str]:
    """Env of every cluster process and client: the venv first on PATH (the job's `python`),
    and Ray 2.60's token authentication with a token of this cluster only (not ~/.ray)."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every live process: pid -> (parent pid, start time, command line)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are dead, just not yet reaped
            table[int(entry.name)] = (int(fields[1]), fields[19], cmdline)
    return table


def _cluster_processes(roots: list[int], marker: str) -> set[tuple[int, str]]:
    """(pid, start time) of the node processes, all their descendants (Ray renames its
    workers `ray::...`, so the tree finds them), and anything naming our temp dir."""
    table = _processes()
    found = {pid for pid, (_, _, cmdline) in table.items() if marker in cmdline}
    frontier = [pid for pid in roots if pid in table]
    while frontier:
        found.update(frontier)
        frontier = [pid for pid, (ppid, _, _) in table.items()
                    if ppid in frontier and pid not in found]
    return {(pid, table[pid][1]) for pid in found if pid in table}


def _stop_node(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group is still there
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _alive_node_ids(dashboard: str, env: dict[str, str]) -> tuple[set[str], str]:
    """IDs of the ALIVE nodes per the state API, and what it said. Until the first node
    registers, the CLI prints "No resource in the cluster" instead of JSON, and right after
    the head starts the state API may refuse: both count as no nodes yet."""
    result = subprocess.run(
        [RAY, "list", "nodes", "--address", dashboard, "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    said = (result.stdout + result.stderr)[-2000:]
    if result.returncode != 0:
        return set(), said
    try:
        nodes = json.loads(result.stdout)
    except json.JSONDecodeError:
        return set(), said
    return {node["node_id"] for node in nodes if node["state"] == "ALIVE"}, said


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head and a worker node on 127.0.0.1, one CPU each; yields (dashboard URL, env)."""
    # Short: Ray puts Unix sockets under the temp dir (a 107-byte path limit).
    temp_root = Path(tempfile.mkdtemp(prefix="rc2n_", dir="/tmp"))
    env = _cluster_env()
    gcs_port, dashboard_port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    node_args = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--block",
                 "--disable-usage-stats"]
    commands = {
        "head": [RAY, "start", "--head", "--port", str(gcs_port), *node_args,
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                 "--ray-client-server-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()),
                 "--temp-dir", str(temp_root / "head")],
        "worker": [RAY, "start", "--address", f"127.0.0.1:{gcs_port}", *node_args,
                   "--dashboard-agent-listen-port", str(free_port()),
                   "--temp-dir", str(temp_root / "worker")],
    }
    nodes: list[subprocess.Popen] = []
    logs = []
    try:
        for name, command in commands.items():
            log = open(tmp_path / f"ray_{name}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            if name == "head":
                wait_for_http(f"{dashboard}/api/gcs_healthz", timeout_s=180)
        deadline = time.monotonic() + 180
        while len((alive := _alive_node_ids(dashboard, env))[0]) < 2:
            assert time.monotonic() < deadline, f"2 nodes not ALIVE within 180 s: {alive[1]}"
            assert all(n.poll() is None for n in nodes), "a ray node exited; see ray_*.log"
            time.sleep(2)
        yield dashboard, env
    finally:
        started = _cluster_processes([node.pid for node in nodes], str(temp_root))
        for node in reversed(nodes):  # the worker node first, then the head
            _stop_node(node)
        for log in logs:
            log.close()
        alive = _processes()
        leaked = sorted(pid for pid, start in started if alive.get(pid, (0, ""))[1] == start)
        leaked += [pid for pid, _ in _cluster_processes([], str(temp_root)) if pid not in leaked]
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_root, ignore_errors=True)
        assert not leaked, f"Ray processes outlived their node: {leaked}"


def _tiny_shard(path: Path, count: int = 4) -> None:
    """A shard as prepare writes it: `<key>.png` (8x8 grayscale) + `<key>.cls`."""
    import io

    import webdataset as wds
    from PIL import Image

    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            png = io.BytesIO()
            Image.new("L", (8, 8), color=i * 60).save(png, format="PNG")
            writer.write({"__key__": f"{i:06d}", "png": png.getvalue(), "cls": str(i).encode()})


def test_shards_by_fsspec_url_are_listed_and_read(tmp_path):
    """`train.shards` as a URL (what a cluster uses for shared storage) reads like a path."""
    from pipeline.data.loader import train_batches
    from pipeline.data.reader import shard_urls

    _tiny_shard(tmp_path / "train-000000.tar")
    urls = shard_urls("train", tmp_path.as_uri())
    assert urls == [(tmp_path / "train-000000.tar").as_uri()]
    batches = list(train_batches(urls, batch_size=2, rank=0, world_size=1, num_batches=3,
                                      seed=0, epoch=0, with_labels=True))
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (2, 1, 8, 8) and set(labels.tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_ray_job_submit_trains_on_two_nodes(two_node_cluster, mnist_shards, mlflow_server,
                                            tmp_path):
    """The stage submitted from a repo copy (data/stats.json but no shards in it) trains with
    one worker per node, reading shards by fsspec URL and checkpointing to shared storage."""
    from mlflow import MlflowClient

    dashboard, env = two_node_cluster
    repo = copy_repo(tmp_path / "repo")  # what `--working-dir` uploads: code + params + stats
    (repo / "data").mkdir()
    shutil.copy(mnist_shards / "data" / "stats.json", repo / "data" / "stats.json")
    storage = tmp_path / "shared" / "ray_storage"  # "shared storage": every node sees /tmp
    experiment = f"cluster-{secrets.token_hex(4)}"
    overrides = {
        "train.num_workers": 2, "train.cpus_per_worker": 1, "train.batch_size": 128,
        "train.epochs": 1, "train.loader_workers": 0, "train.max_failures": 0,
        "model.nz": 16, "model.ngf": 8, "model.ndf": 8,
        "train.shards": (mnist_shards / "data" / "shards").as_uri(),  # file:///...: fsspec
        "train.storage_path": str(storage),
        "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": experiment,
    }
    submission_id = f"dcgan-test-{secrets.token_hex(4)}"
    command = [RAY, "job", "submit", "--address", dashboard, "--submission-id", submission_id,
               "--working-dir", str(repo), "--", "python", "stages/train.py"]
    for key, value in overrides.items():
        command += ["-S", f"{key}={value}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"Job '{submission_id}' succeeded" in output, output[-2000:]

    status = subprocess.run([RAY, "job", "status", "--address", dashboard, submission_id],
                            env=env, capture_output=True, text=True, timeout=120)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr

    # MLflow: the run finished, with the loss curves and the stage's record as an artifact.
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train/loss_d")) >= 1
    record_path = client.download_artifacts(run.info.run_id, "train_run.json", str(tmp_path))
    record = json.loads(Path(record_path).read_text())

    # The job's own models/ vanished with it; the run holds the generator at the same paths.
    restored = Path(client.download_artifacts(run.info.run_id, "models", str(tmp_path)))
    from pipeline.core.layout import Layout
    from pipeline.evaluate.evaluation import load_trained_generator

    _, spec = load_trained_generator(Layout(restored.parent))
    assert spec.sha256 == record["generator_sha256"]
    assert spec.steps == record["steps"]

    # The two workers ran on the two different nodes of the cluster.
    alive, _ = _alive_node_ids(dashboard, env)
    assert len(record["worker_node_ids"]) == 2
    assert set(record["worker_node_ids"]) == alive

    # The final checkpoint is in the storage path, loadable, at the last step.
    checkpoint = Path(record["final_checkpoint"])
    assert checkpoint.is_relative_to(storage)
    assert (checkpoint / "state.pt").is_file()
    from pipeline.train import checkpoints

    assert checkpoints.load_state(checkpoint)["step"] == record["steps"] > 0
