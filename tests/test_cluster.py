"""The README's cluster recipe, run as written on a real 2-node Ray cluster on 127.0.0.1:
`make cluster-up NODES=2` (deploy/cluster.py, token authentication), `ray job submit` of the
train stage from a fresh clone, `python -m pipeline import-run`, a `dvc repro` that evaluates
and registers without training again, `make cluster-down`; and the cluster's failures as a
user meets them, each one a row of the README's troubleshooting table.

One cluster for the module: the one the README's blocks start. One CPU per node and two
training workers: the workers can only run on different nodes. `make cluster-down` must stop
exactly that cluster: the session's other local Ray (the `ray_cluster` fixture) lives on.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, SESSION_RAY_ENV, VENV_BIN, fresh_git_repo, git, stage_env
from readme_helpers import (
    assert_in_troubleshooting,
    clean_home,
    readme_block,
    run_block,
    without,
)

from devtools.gloo import free_port

RAY = str(VENV_BIN / "ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
# Real MNIST, tiny models, one short epoch on 2 workers, a small evaluation.
CLUSTER_PARAMS = {
    "model": {"nz": 16, "ngf": 8, "ndf": 8},
    "train": {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 128, "epochs": 1,
              "loader_workers": 0, "max_failures": 0},
    "classifier": {"epochs": 1, "batch_size": 256, "min_val_accuracy": 0.0},
    "eval": {"num_samples": 100, "batch_size": 100, "kid_subset_size": 50},
}


@dataclass
class Cluster:
    """The repo clone the README's commands run in, its shell's environment after
    `cluster-up` (token, CLUSTER_HEAD, CLUSTER_DASHBOARD), and the MLflow server."""

    repo: Path
    env: dict[str, str]
    mlflow: str

    @property
    def head(self) -> str:
        return self.env["CLUSTER_HEAD"]

    @property
    def dashboard(self) -> str:
        return self.env["CLUSTER_DASHBOARD"]


def _cluster_repo(target: Path, mnist_shards: Path) -> Path:
    """A fresh clone where `dvc repro prepare` already ran (the shards of mnist_shards, which
    prepare makes byte-identical, recorded with `dvc commit`). The venv's tools come first on
    PATH (`stage_env`), as after `source .venv/bin/activate`."""
    repo = fresh_git_repo(target, CLUSTER_PARAMS)
    shutil.copytree(mnist_shards / "data", repo / "data", dirs_exist_ok=True)
    (repo / "metrics").mkdir(parents=True, exist_ok=True)
    shutil.copy(mnist_shards / "metrics" / "prepare.json", repo / "metrics" / "prepare.json")
    result = subprocess.run(["dvc", "commit", "--force", "prepare"], cwd=repo,
                            env=stage_env(repo), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "prepared")
    return repo


def _processes_naming(marker: str) -> list[int]:
    """Live processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def readme_cluster(mnist_shards, mlflow_server, tmp_path_factory):
    """The README's `cluster-up` block run in a fresh clone (free ports, given as the
    CLUSTER_PORT / CLUSTER_DASHBOARD_PORT the Makefile reads); its `cluster-down` block at
    the end, which must leave no process of the cluster behind."""
    repo = _cluster_repo(tmp_path_factory.mktemp("cluster") / "repo", mnist_shards)
    env = {**without(stage_env(repo), *AUTH_VARS, *SESSION_RAY_ENV), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": mlflow_server, "CLUSTER_PORT": str(free_port()),
           "CLUSTER_DASHBOARD_PORT": str(free_port())}
    state_file = repo / ".ray_cluster" / "cluster.json"
    try:
        result, after = run_block(readme_block("cluster-up"), repo, env, timeout_s=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Ray cluster up: 2 node(s)" in result.stdout
        yield Cluster(repo, after, mlflow_server)
    finally:
        temp_root = json.loads(state_file.read_text())["temp_root"] if state_file.exists() else ""
        result, _ = run_block(readme_block("cluster-down"), repo, env, timeout_s=300)
        leaked = _processes_naming(temp_root) if temp_root else []
        for pid in leaked:  # only what names this cluster's own temp dir
            os.kill(pid, 9)
        assert result.returncode == 0, result.stdout + result.stderr
        assert not leaked, f"Ray processes outlived `make cluster-down`: {leaked}"
        assert "no process of the cluster is left" in result.stdout, result.stdout


def _alive_node_ids(cluster: Cluster) -> set[str]:
    """IDs of the ALIVE nodes, as `ray list nodes` prints them."""
    result = subprocess.run([RAY, "list", "nodes", "--address", cluster.dashboard, "--format",
                             "json"], env=cluster.env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {node["node_id"] for node in json.loads(result.stdout) if node["state"] == "ALIVE"}


def _stage_lines(output: str, stage: str) -> bool:
    return f"Running stage '{stage}'" in output


# --- the recipe ---------------------------------------------------------------------------------


def test_readme_recipe_trains_on_two_nodes_then_dvc_evaluates_and_registers(readme_cluster,
                                                                            tmp_path):
    """The README's job block as written: the job trains one worker per node, import-run
    brings its result into the clone and dvc.lock, and `dvc repro` evaluates and registers it
    (into the run that trained it) without training again."""
    from mlflow import MlflowClient

    from pipeline.core.files import sha256_file
    from pipeline.core.layout import Layout
    from pipeline.core.records import GeneratorRecord, RegistryRecord, TrainRun
    from pipeline.train import checkpoints

    cluster = readme_cluster
    result, _ = run_block(readme_block("cluster-job"), cluster.repo, cluster.env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "succeeded" in output and "imported run" in output
    # dvc repro went on from the imported generator: no prepare, no train.
    dvc_output = output[output.index("imported run"):]
    assert _stage_lines(dvc_output, "evaluate") and _stage_lines(dvc_output, "register")
    assert not _stage_lines(dvc_output, "train") and not _stage_lines(dvc_output, "prepare")
    assert "Stage 'train' didn't change, skipping" in dvc_output

    layout = Layout(cluster.repo)
    train_run = TrainRun.load(layout)
    job = train_run.ray_job_submission_id
    status = subprocess.run([RAY, "job", "status", "--address", cluster.dashboard, job],
                            env=cluster.env, capture_output=True, text=True, timeout=120)
    assert f"Job '{job}' succeeded" in status.stdout + status.stderr

    # The two workers ran on the two different nodes of the cluster.
    assert len(train_run.worker_node_ids) == 2
    assert set(train_run.worker_node_ids) == _alive_node_ids(cluster)
    # The checkpoints are in the shared storage the command named, loadable, at the last step.
    checkpoint = Path(train_run.final_checkpoint)
    assert checkpoint.is_relative_to(cluster.repo / ".ray_storage")
    assert checkpoints.load_state(checkpoint)["step"] == train_run.steps > 0

    # The imported generator is the run's, and dvc.lock records it as the train stage's output.
    generator = GeneratorRecord.load(layout)
    generator.verified_weights(layout)
    assert generator.sha256 == train_run.generator_sha256 and generator.steps == train_run.steps
    lock = yaml.safe_load((cluster.repo / "dvc.lock").read_text())["stages"]["train"]
    assert {out["path"] for out in lock["outs"]} >= {"models/generator.pt", "reports/train_log.csv"}
    assert lock["params"]["params.yaml"]["mlflow"]["tracking_uri"] == cluster.mlflow
    assert (cluster.repo / "reports" / "train_grids" / "epoch_001.png").is_file()

    # One MLflow run holds it all: the training, its evaluation, the registered version.
    client = MlflowClient(tracking_uri=cluster.mlflow)
    run = client.get_run(train_run.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train/loss_d")) >= 1
    assert "eval/fid_classifier" in run.data.metrics
    registered = RegistryRecord.load(layout)
    version = client.get_model_version(registered.name, registered.version)
    assert version.run_id == train_run.mlflow_run_id

    status = subprocess.run(["dvc", "status"], cwd=cluster.repo, env=cluster.env,
                            capture_output=True, text=True, timeout=300)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr

    # MLflow's own download, as the README writes it: the generator, and no stray mlflow.db.
    download = _readme_line("mlflow artifacts download").replace(
        "http://<mlflow-server>:5000", cluster.mlflow).replace("<run id>", run.info.run_id)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(["bash", "-c", download], cwd=elsewhere, env=cluster.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sha256_file(elsewhere / "models" / "generator.pt") == train_run.generator_sha256
    assert not (elsewhere / "mlflow.db").exists()


def _readme_line(starting: str) -> str:
    """The README's command (inline code, maybe wrapped over lines) that contains `starting`."""
    from readme_helpers import README

    text = " ".join(README.read_text().split())
    start = text.index(starting)
    begin = text.rindex("`", 0, start) + 1
    return text[begin:text.index("`", start)]


def test_cluster_env_prints_what_cluster_env_holds(readme_cluster):
    result = subprocess.run(["python", "deploy/cluster.py", "env"], cwd=readme_cluster.repo,
                            env=readme_cluster.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (readme_cluster.repo / ".ray_cluster" / "cluster.env").read_text()


def test_dashboard_listens_on_the_cluster_host_only(readme_cluster):
    """CLUSTER_HOST=127.0.0.1 keeps the dashboard (which runs jobs) local, as the README says."""
    port = int(readme_cluster.dashboard.rsplit(":", 1)[1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                listening.add(address)
    assert listening == {"0100007F"}  # 127.0.0.1, little-endian hex


_BESIDE_A_RECORDED_CLUSTER = textwrap.dedent("""
    import json
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.core import connect
    # No dashboard: nothing here reads Ray's state API (~4 s of CPU less, measured).
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        recorded = ray._private.utils.read_ray_address()
        ray = connect.connect_ray(log_to_driver=False)
        print(json.dumps({"cluster": cluster.address, "recorded": recorded,
                          "joined": ray.get_runtime_context().gcs_address,
                          "started_here": connect.started_here()}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_a_driver_without_ray_address_starts_its_own_ray_beside_a_recorded_cluster():
    """A cluster started on this machine earlier (`ray start`, or Ray's test Cluster) is recorded
    in /tmp/ray/ray_current_cluster, and `ray.init()` alone joins it. A stage run with no
    RAY_ADDRESS starts a Ray of its own instead: a background `dvc repro` of this suite once
    trained on another test's cluster, and died with it."""
    result = subprocess.run(["python", "-c", _BESIDE_A_RECORDED_CLUSTER], cwd=REPO_ROOT,
                            env=without(stage_env(REPO_ROOT), *AUTH_VARS), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["recorded"] == seen["cluster"]  # what a bare ray.init() would have joined
    assert seen["joined"] != seen["cluster"] and seen["started_here"] is True


# --- failures, as users meet them ---------------------------------------------------------------


def _driver(cluster: Cluster, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The train stage as a driver (`RAY_ADDRESS=... python stages/train.py`)."""
    return subprocess.run(["python", "stages/train.py"], cwd=cluster.repo, env=env,
                          capture_output=True, text=True, timeout=300)


def _driver_cases(cluster: Cluster, tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    """name -> (environment, what the one line must say)."""
    no_auth = {**without(cluster.env, *AUTH_VARS), "HOME": clean_home(tmp_path)}
    file_only = {**no_auth, "HOME": clean_home(tmp_path / "file")}
    Path(file_only["HOME"], ".ray", "auth_token").write_text(cluster.env["RAY_AUTH_TOKEN"])
    return {
        "no token": ({**no_auth, "RAY_ADDRESS": cluster.head}, "requires a token"),
        "token file without RAY_AUTH_MODE": ({**file_only, "RAY_ADDRESS": cluster.head},
                                             "RAY_AUTH_MODE is not set"),
        "wrong token": ({**cluster.env, "RAY_ADDRESS": cluster.head,
                         "RAY_AUTH_TOKEN": secrets.token_hex(32)}, "rejected this token"),
        "head down": ({**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"},
                      "no Ray head answers"),
        "dashboard address": ({**cluster.env, "RAY_ADDRESS": cluster.head.rsplit(":", 1)[0]
                               + ":" + cluster.dashboard.rsplit(":", 1)[1]},
                              "is an HTTP server, not a Ray head"),
    }


def test_driver_connection_failures_are_one_line_each(readme_cluster, tmp_path):
    """`RAY_ADDRESS=<head> python stages/train.py` with a missing or wrong token, a head that is
    not there, or the dashboard's port: exit 1 with one `error:` line that the README's
    troubleshooting table lists, and no traceback."""
    for name, (env, says) in _driver_cases(readme_cluster, tmp_path).items():
        result = _driver(readme_cluster, env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, f"{name}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr[-3000:]}"
        assert lines[-1].startswith("error: ") and says in lines[-1], f"{name}: {lines[-1]}"
        assert_in_troubleshooting(lines[-1])


def test_ray_job_submit_failures_match_the_troubleshooting_table(readme_cluster, tmp_path):
    """What `ray job submit` (Ray's own CLI) says without the token, with a wrong one, and with
    the GCS port for the dashboard's is in the troubleshooting table."""
    cluster = readme_cluster
    no_auth = {**without(cluster.env, *AUTH_VARS), "HOME": clean_home(tmp_path)}
    gcs_as_dashboard = f"http://{cluster.head}"
    cases = {
        "no token": (no_auth, cluster.dashboard, "Missing authentication token"),
        "wrong token": ({**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)},
                        cluster.dashboard, "Invalid authentication token"),
        "wrong address": (cluster.env, gcs_as_dashboard, "Failed to connect to Ray"),
    }
    for name, (env, address, says) in cases.items():
        result = subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"],
                                env=env, capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"{name}: {output[-2000:]}"
        seen = [line for line in output.splitlines() if says in line]
        assert seen, f"{name}: {output[-2000:]}"
        assert_in_troubleshooting(seen[0])


def test_failed_job_names_the_workers_error_and_the_logs_command(readme_cluster, tmp_path):
    """A job whose worker fails: `ray job submit` ends with the stage's one line, which names
    the worker's first error line and a `ray job logs` command that shows the whole log."""
    cluster = readme_cluster
    job = f"dcgan-fail-{secrets.token_hex(4)}"
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", job,
               "--working-dir", str(cluster.repo), "--",
               "env", "DCGAN_FAULT_INJECT=step=1,rank=1,mode=raise", "python", "stages/train.py",
               "-S", f"train.shards={cluster.repo / 'data' / 'shards'}",
               "-S", f"train.storage_path={tmp_path / 'ray_storage'}",
               "-S", f"mlflow.tracking_uri={cluster.mlflow}"]
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"Job '{job}' failed" in output, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors, output[-4000:]
    line = errors[-1]
    assert "InjectedFaultError: injected fault at step 1 on rank 1" in line, line
    logs_command = f"ray job logs {job} --address {cluster.dashboard}"
    assert line.endswith(f"the whole log: {logs_command}"), line
    assert_in_troubleshooting(line)

    logs = subprocess.run(shlex.split(logs_command), env=cluster.env, capture_output=True,
                          text=True, timeout=120)
    assert logs.returncode == 0 and "InjectedFaultError" in logs.stdout, logs.stderr[-2000:]


def test_a_node_of_another_host_joins_and_leaves(readme_cluster, tmp_path):
    """The README's several-hosts recipe, on this host: with the head's token exported,
    `deploy/cluster.py join <head>` adds a node, and its `down` takes exactly that one away."""
    cluster = readme_cluster
    other_host = {**cluster.env, "CLUSTER_STATE_DIR": str(tmp_path / "other_host")}
    script = str(cluster.repo / "deploy" / "cluster.py")
    joined = subprocess.run(["python", script, "join", cluster.head, "--cpus-per-node", "1"],
                            env=other_host, capture_output=True, text=True, timeout=300)
    try:
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert f"worker node joined {cluster.head}" in joined.stdout
        _wait_for_nodes(cluster, 3)
    finally:
        down = subprocess.run(["python", script, "down"], env=other_host, capture_output=True,
                              text=True, timeout=300)
    assert down.returncode == 0 and down.stdout.startswith("stopped worker;"), down.stdout
    _wait_for_nodes(cluster, 2)  # the README's two nodes live on


def _wait_for_nodes(cluster: Cluster, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(alive := _alive_node_ids(cluster)) != count:
        assert time.monotonic() < deadline, f"{len(alive)} nodes ALIVE, expected {count}"
        time.sleep(2)


# --- fast: the shard URL a cluster reads --------------------------------------------------------


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
