"""Training that survives its driver and its tracking server (issue 24): an interrupted train
stage (Ctrl-C, SIGTERM, SIGKILL) continues its run; a tracking server that goes away costs no
training, and `python -m pipeline sync-run` uploads what it missed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    copy_repo,
    fresh_git_repo,
    git,
    session_ray_env,
    stage_env,
    start_mlflow_server,
    stop_process,
)
from test_training import TINY, assert_as_straight_run, tiny_config

from devtools.gloo import free_port
from pipeline.core.config import load_config, set_params
from pipeline.train import resume
from pipeline.train.faults import FAULT_ENV
from pipeline.train.preflight import spill_dir
from pipeline.train.tracking_buffer import TrackingBuffer, pending, sync

# 4,500 train images / 128 = 35 steps per epoch, 70 in all; checkpoints every 10 steps.
STEPS = 70
STAGE_PARAMS = [*TINY, "train.num_workers=1", "train.cpus_per_worker=1",
                "train.batch_size=128", "train.epochs=2", "train.checkpoint_every_steps=10"]
LOGGED_STEPS = [step * 128 for step in (10, 20, 30, 35, 40, 50, 60, 70)]
WAIT_S = 420  # bound of every wait on a training (a loaded 2-core machine)
# Chains of a few processes that wait on each other (and on a 5 s pause) for minutes: beside
# the foreground, from the session's start (tests/conftest.py). Not niced: their bounded waits
# (a Ctrl-C'd run stops within 120 s) assume a fair share of the CPU. The restarted server's
# test stays in the foreground: its server must be back before the run's end.
RESUME_LANE = pytest.mark.background(lane="resume")


def workspace(mnist_shards: Path, tmp_path: Path) -> Path:
    """A repository copy holding mnist5k's shards, to run `python stages/train.py` in."""
    repo = copy_repo(tmp_path / "repo")
    shutil.copytree(mnist_shards / "data", repo / "data")
    return repo


def stage_args(tracking_uri: str, storage: Path, experiment: str, *extra: str) -> list[str]:
    args = [sys.executable, "stages/train.py"]
    for setting in (*STAGE_PARAMS, f"mlflow.tracking_uri={tracking_uri}",
                    f"mlflow.experiment={experiment}", f"train.storage_path={storage}", *extra):
        args += ["-S", setting]
    return args


def ray_env(repo: Path, ray_cluster, fault: str = "") -> dict[str, str]:
    """The stage joins the session's Ray cluster (RAY_ADDRESS), as on a cluster."""
    env = session_ray_env(repo, ray_cluster)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return env


def run_to_end(repo: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=WAIT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def start_and_pause(repo: Path, args: list[str], env: dict[str, str],
                    storage: Path) -> subprocess.Popen:
    """Start the stage (its own process group, as a shell job) and return once rank 0 paused
    at step 25, after the checkpoint at step 20 was registered (the `hang` fault)."""
    markers_before = set(storage.glob("*/fault_injected"))
    process = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + WAIT_S
    while not set(storage.glob("*/fault_injected")) - markers_before:
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # gone already: it failed early
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate(timeout=60)
            pytest.fail(f"the stage never reached step 25:\n{(out + err)[-3000:]}")
        time.sleep(0.5)
    return process


def runs_of(tracking_uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def metric_steps(tracking_uri: str, run_id: str, key: str = "train/loss_d") -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def record_of(repo: Path) -> dict:
    return json.loads((repo / "reports" / "train_run.json").read_text())


# --- fast: identity and the buffer ---------------------------------------------------------------


def test_the_identity_follows_what_changes_the_result_only():
    base = tiny_config()
    same = resume.identity_digest(base, "d" * 64, None)
    assert same == resume.identity_digest(base, "d" * 64, None)  # stable across calls
    for unchanged in ("train.storage_path=/elsewhere", "train.max_failures=5",
                      "train.resume=never", "mlflow.experiment=other"):
        assert resume.identity_digest(tiny_config(**dict([unchanged.split("=")])), "d" * 64,
                                      None) == same, unchanged
    assert resume.identity_digest(tiny_config(**{"train.lr_g": 0.001}), "d" * 64, None) != same
    assert resume.identity_digest(base, "e" * 64, None) != same
    assert resume.identity_digest(base, "d" * 64, "c" * 64) != same


def test_the_identity_follows_the_code_training_runs(tmp_path):
    code = tmp_path / "code"
    shutil.copytree(Path(resume.__file__).parents[2] / "pipeline", code / "pipeline")
    cfg = tiny_config()
    before = resume.identity_digest(cfg, "d" * 64, None, code)
    loop = code / "pipeline" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n# a change\n")
    assert resume.identity_digest(cfg, "d" * 64, None, code) != before
    registry = code / "pipeline" / "registry" / "promote.py"  # not run by training
    registry.write_text(registry.read_text() + "\n# a change\n")
    changed = resume.identity_digest(cfg, "d" * 64, None, code)
    loop.write_text(loop.read_text().removesuffix("\n# a change\n"))
    assert resume.identity_digest(cfg, "d" * 64, None, code) == before != changed


def test_a_later_fresh_run_gets_a_name_of_its_own(tmp_path):
    identity = "ab" * 32
    first = resume.fresh_name(identity, str(tmp_path), set())
    assert first == "dcgan-" + identity[:12]
    (tmp_path / first).mkdir()
    assert resume.fresh_name(identity, str(tmp_path), set()) == first + "-2"
    assert resume.fresh_name(identity, str(tmp_path), {first + "-2"}) == first + "-3"


def test_the_buffer_keeps_what_the_server_did_not_take_and_sync_uploads_it_once(
    mlflow_server, tmp_path
):
    """Rank 0's buffer pointed at a server that does not answer spills its rows and grids;
    `sync` uploads them to the run once the server answers, and a second sync adds nothing."""
    import torch

    from pipeline.core import tracking
    from pipeline.data.grids import display_copy, make_grid

    tracking.bound_http_retries({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    run_id, _ = tracking.start_run(mlflow_server, "buffer", {})
    away = f"http://127.0.0.1:{free_port()}"  # the run's server, while it is away
    buffer = TrackingBuffer(away, run_id, tmp_path / "spill")
    buffer.metrics([{"step": 2, "train/loss_d": 2.0}, {"step": 3, "train/loss_d": 3.0}])
    buffer.image(display_copy(make_grid(torch.zeros(4, 1, 8, 8), nrow=2)), "train/samples", 3)
    unlogged = buffer.close(timeout_s=3)
    assert (unlogged.metric_rows, unlogged.images) == (2, 1)
    assert pending(tmp_path / "spill") == unlogged
    sent = sync(tmp_path / "spill", mlflow_server, run_id)
    assert (sent.metric_rows, sent.images) == (2, 1)
    again = sync(tmp_path / "spill", mlflow_server, run_id)
    assert (again.metric_rows, again.images) == (0, 0)
    assert metric_steps(mlflow_server, run_id) == [2, 3]
    assert tracking.last_image_step(mlflow_server, run_id, "train/samples") == 3


# --- real Ray, real server: the interrupted driver -----------------------------------------------


def dvc_workspace(mnist_shards: Path, tmp_path: Path, settings: list[str]) -> Path:
    """A fresh git repository (what a user has after a clone) whose committed params.yaml holds
    `settings`, with mnist5k's shards in data/ and no classifier (no quality while training),
    to run the train stage with `dvc repro` / `dvc exp run`."""
    import yaml

    params: dict[str, dict] = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        section, name = key.split(".", 1)
        params.setdefault(section, {})[name] = yaml.safe_load(value)
    repo = fresh_git_repo(tmp_path / "repo", params)
    shutil.copytree(mnist_shards / "data", repo / "data", dirs_exist_ok=True)
    shutil.copy(mnist_shards / "metrics" / "prepare.json", repo / "metrics" / "prepare.json")
    # As after the user's `dvc repro` of prepare: its outputs in dvc.lock and the cache
    # (`dvc exp run` checks out what dvc.lock names).
    subprocess.run(["dvc", "commit", "-f", "-q", "prepare"], cwd=repo, env=stage_env(repo),
                   check=True, capture_output=True, timeout=120)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "prepared")
    (repo / "models" / "classifier").mkdir(parents=True)  # a dep of train; empty: no quality
    return repo


def dvc_train(repo: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    """`dvc <command> -s train` run to its end: only the train stage, as its outputs' user."""
    result = subprocess.run(["dvc", *command, "-s", "train"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def runs_with_lr_g(tracking_uri: str, experiment: str, lr_g: float) -> list:
    return [run for run in runs_of(tracking_uri, experiment)
            if float(run.data.params["train.lr_g"]) == lr_g]


def assert_continued(repo: Path, rerun: subprocess.CompletedProcess, interrupted, mlflow_server,
                     experiment: str) -> dict:
    """The rerun continued the interrupted Ray run from its checkpoint at step 20 and its
    MLflow run, which is now the only one of its params, finished, its history logged once,
    and ended with the bits of a straight run. Returns the rerun's record."""
    record = record_of(repo)
    assert f"resuming Ray run {record['ray_run_name']} from its checkpoint at step 20" in (
        rerun.stderr)
    assert record["resumed_from_steps"] == [20] and record["steps"] == STEPS
    assert record["mlflow_run_id"] == interrupted.info.run_id  # the same MLflow run
    cfg = load_config(repo / "params.yaml", [f"train.shards={repo / 'data' / 'shards'}"])
    (run,) = runs_with_lr_g(mlflow_server, experiment, cfg.train.lr_g)
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    # The history continues: every logged step once, none twice.
    assert metric_steps(mlflow_server, record["mlflow_run_id"]) == LOGGED_STEPS
    assert_as_straight_run(cfg, record, repo)
    return record


@RESUME_LANE
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_interrupted_dvc_run_of_the_train_stage_continues_its_run_bit_identically(
    ray_cluster, mlflow_server, mnist_shards, tmp_path_factory
):
    """Ctrl-C during `dvc repro`, then `dvc repro`; the driver killed during `dvc exp run`, an
    experiment of other params in between, then the killed one's `dvc exp run` again: each
    rerun continues its interrupted Ray run and MLflow run, and ends as a straight run would.
    A finished run is never resumed: forced to run again, the stage trains a fresh one."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    storage, experiment = tmp_path / "ray", "resume"
    repo = dvc_workspace(mnist_shards, tmp_path, [
        *STAGE_PARAMS, f"mlflow.tracking_uri={mlflow_server}", f"mlflow.experiment={experiment}",
        f"train.storage_path={storage}"])
    committed_lr_g = load_config(repo / "params.yaml", []).train.lr_g
    paused = ray_env(repo, ray_cluster, "step=25,mode=hang")

    # Ctrl-C: the terminal signals the whole foreground job.
    process = start_and_pause(repo, ["dvc", "repro", "-s", "train"], paused, storage)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0, err[-5000:]
    (line,) = [line for line in err.splitlines() if "error: interrupted: MLflow run " in line]
    assert "KILLED" in line and "last at step 20" in line and "`dvc repro`" in line, line
    (interrupted,) = runs_of(mlflow_server, experiment)
    assert interrupted.info.status == "KILLED"
    rerun = dvc_train(repo, ray_env(repo, ray_cluster), "repro")
    first = assert_continued(repo, rerun, interrupted, mlflow_server, experiment)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "trained")

    # SIGKILL: the session is lost at once (an OOM kill, a closed laptop), dvc and the driver
    # with it, during an experiment of other params.
    other = ["-S", "train.lr_g=0.001"]
    process = start_and_pause(repo, ["dvc", "exp", "run", "-s", "train", *other], paused,
                              storage)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=120)
    (killed,) = runs_with_lr_g(mlflow_server, experiment, 0.001)
    assert killed.info.status == "RUNNING"  # nobody could mark it

    # The committed params again, forced: their run finished, so a fresh run trains, and the
    # killed one stays as it was.
    forced = dvc_train(repo, ray_env(repo, ray_cluster), "exp", "run", "-f",
                       "-S", f"train.lr_g={committed_lr_g}")
    assert "fresh Ray run" in forced.stderr and "finished" in forced.stderr
    assert record_of(repo)["ray_run_name"] == first["ray_run_name"] + "-2"
    assert record_of(repo)["resumed_from_steps"] == []
    (still_killed,) = runs_with_lr_g(mlflow_server, experiment, 0.001)
    assert still_killed.info.status == "RUNNING"

    rerun = dvc_train(repo, ray_env(repo, ray_cluster), "exp", "run", *other)
    assert_continued(repo, rerun, killed, mlflow_server, experiment)


# --- real Ray, real server: the tracking server goes away ----------------------------------------


@RESUME_LANE
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_stopped_tracking_server_costs_no_training_and_sync_run_completes_the_run(
    ray_cluster, mnist_shards, tmp_path_factory
):
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("server_away")
    repo = workspace(mnist_shards, tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path / "server", port)
    storage = tmp_path / "ray"
    args = stage_args(uri, storage, "server-away")
    try:
        process = start_and_pause(repo, args,
                                  ray_env(repo, ray_cluster, "step=25,mode=hang,seconds=5"),
                                  storage)
        stop_process(server)  # during the pause: the rest of the run has no server
        _, err = process.communicate(timeout=WAIT_S)
        assert process.returncode == 0, err[-4000:]
        record = record_of(repo)
        assert record["steps"] == STEPS and (repo / "models" / "generator.pt").exists()
        warnings = [line for line in err.splitlines() if "is incomplete" in line]
        assert len(warnings) == 1, err[-4000:]
        command = f"python -m pipeline sync-run {record['mlflow_run_id']}"
        assert warnings[0].endswith(command) and "metric row(s)" in warnings[0]

        server = start_mlflow_server(tmp_path / "server", port)
        # sync-run finds the run's storage as the stage did: train.storage_path of params.yaml.
        set_params(repo / "params.yaml", {"train.storage_path": str(storage)})
        sync_args = [sys.executable, "-m", "pipeline", "sync-run", record["mlflow_run_id"],
                     "--tracking-uri", uri]
        synced = subprocess.run(sync_args, cwd=repo, env=stage_env(repo), capture_output=True,
                                text=True, timeout=120)
        assert synced.returncode == 0, synced.stderr[-3000:]
        run = MlflowClient(uri).get_run(record["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert metric_steps(uri, run.info.run_id) == LOGGED_STEPS  # complete, not doubled
        artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "models")}
        assert "models/generator.pt" in artifacts
        twice = subprocess.run(sync_args, cwd=repo, env=stage_env(repo), capture_output=True,
                               text=True, timeout=120)
        assert twice.returncode == 0 and "nothing to upload" in twice.stdout
    finally:
        stop_process(server)


def lines_of(stream) -> list[str]:
    """The lines of `stream` as they come, read by a daemon thread (the caller polls)."""
    lines: list[str] = []

    def read() -> None:
        for line in stream:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_tracking_server_restarted_within_the_run_loses_nothing(ray_cluster, mnist_shards,
                                                                   tmp_path):
    """The server stops at step 25 and is back once rank 0 found it gone: training never
    waits, the buffer sends what waited, and the run is complete without a sync."""
    from mlflow import MlflowClient

    repo = workspace(mnist_shards, tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path / "server", port)
    storage = tmp_path / "ray"
    try:
        process = start_and_pause(repo, stage_args(uri, storage, "server-back"),
                                  ray_env(repo, ray_cluster, "step=25,mode=hang,seconds=5"),
                                  storage)
        stop_process(server)
        err = lines_of(process.stderr)
        deadline = time.monotonic() + WAIT_S
        while not any("server not answering" in line for line in err):
            assert process.poll() is None and time.monotonic() < deadline, "".join(err)[-4000:]
            time.sleep(0.2)
        server = start_mlflow_server(tmp_path / "server", port)
        assert process.wait(timeout=WAIT_S) == 0, "".join(err)[-4000:]
        assert not [line for line in err if "is incomplete" in line], "".join(err)[-4000:]
        record = record_of(repo)
        run = MlflowClient(uri).get_run(record["mlflow_run_id"])
        assert run.info.status == "FINISHED" and record["steps"] == STEPS
        assert metric_steps(uri, run.info.run_id) == LOGGED_STEPS  # all of it, once
        spilled = pending(spill_dir(str(storage), record["ray_run_name"]))
        assert (spilled.metric_rows, spilled.images, spilled.spill_dir) == (0, 0, None)
    finally:
        stop_process(server)


# --- the stages that need the server -------------------------------------------------------------


@pytest.mark.parametrize("stage", ["evaluate", "register"])
def test_evaluate_and_register_fail_in_one_line_when_the_server_is_down(
    mlflow_server, tmp_path, stage
):
    from registry_helpers import error_lines, make_workspace

    root = tmp_path / "ws"
    make_workspace(root, mlflow_server, seed=0, fid=10.0)
    dead = f"http://127.0.0.1:{free_port()}"
    train_run = root / "reports" / "train_run.json"
    train_run.write_text(train_run.read_text().replace(mlflow_server, dead))
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "stages" / f"{stage}.py"),
         "-S", f"mlflow.tracking_uri={dead}"],
        cwd=root, env=stage_env(Path(__file__).parents[1]), capture_output=True, text=True,
        timeout=30,  # the bound the issue sets
    )
    assert result.returncode == 1
    assert error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
    assert "not reachable" in result.stderr and "Traceback" not in result.stderr
