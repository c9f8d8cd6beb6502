"""The whole DAG with real DVC on a fresh git repo (a copy of this one, tiny params):
`dvc repro` makes every output, a second one does nothing, `dvc exp run -S train.epochs=2
-S train.lr_g=0.0001` reruns train and what follows only and records a comparable experiment, a
sweep queued with `dvc exp run --queue -S 'train.lr_d=0.0001,0.0003'` and run by `dvc queue
start` lands in the workspace's MLflow store and compares with `python -m pipeline compare
--dvc-exp`, `dvc metrics show` / `dvc plots show` read what the stages wrote, and the MLflow UI
shows a run in a real browser.

Each test is a `background` test (tests/conftest.py): its body runs in a thread from the
session's first test, and the test reports its outcome at the end of the session. Its train
stages join the session's Ray cluster (`RAY_ADDRESS`, as after `source .ray_cluster/cluster.env`):
a stage that starts a Ray of its own is tested in tests/test_cluster.py, and five more local
Rays here would cost the suite ~50 s of CPU."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import BACKGROUND_NICE, fresh_git_repo, git, session_ray_env, stage_env
from mlflow import MlflowClient
from PIL import Image

from devtools.ui_screenshot import find_chromium

pytestmark = [pytest.mark.slow, pytest.mark.background]

# `dvc exp show --drop '.*' --keep ...` of the README's "Sweeps": the columns that compare a sweep.
SWEEP_COLUMNS = r"Experiment|^train\.(epochs|lr_g|lr_d)$|^fid_classifier$|^classes_hit$"

# mnist5k at 32 px (the real data), but small models, one short epoch and a small evaluation.
# Prepare decodes in one local process although RAY_ADDRESS is set (the two-node recipe of
# tests/test_cluster.py shards with Ray tasks); one worker of one CPU leaves the session's
# cluster room for the other tests' workers.
TINY_PARAMS = {
    "data": {"num_processes": 1, "backend": "local"},
    "model": {"nz": 16, "ngf": 8, "ndf": 8},
    "train": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 256, "epochs": 1,
              "loader_workers": 0, "checkpoint_every_steps": 1000, "max_failures": 0},
    "classifier": {"epochs": 1, "batch_size": 256, "min_val_accuracy": 0.0},
    "eval": {"num_samples": 100, "batch_size": 100, "kid_subset_size": 50},
}


def _dvc(repo: Path, *args: str, columns: int = 200) -> str:
    """Run `dvc ARGS` in `repo` as a user would, in a terminal `columns` wide, its stages
    joining the session's Ray cluster (the test asks for `ray_cluster`); return its output,
    fail with it on error."""
    import ray

    env = {**session_ray_env(repo, ray), "OMP_NUM_THREADS": "1", "COLUMNS": str(columns),
           # Beside the suite, a worker group can take longer than Ray's 60 s to start.
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    # Files, not pipes: `dvc queue start` forks its worker with these descriptors, and a pipe
    # would keep this call waiting until the worker exits (when the queue is done, or never).
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        result = subprocess.run([*BACKGROUND_NICE, "dvc", *args], cwd=repo, env=env,
                                stdout=stdout, stderr=stderr, text=True, timeout=900)
        output = _read_from_start(stdout) + _read_from_start(stderr)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-5000:]}"
    return output


def _read_from_start(stream) -> str:
    stream.seek(0)
    return stream.read()


def _declared_outputs(repo: Path) -> list[str]:
    """Every path dvc.yaml declares as outs, metrics or plots."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    declared = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                declared.append(entry if isinstance(entry, str) else next(iter(entry)))
    return declared


def _ran(output: str) -> set[str]:
    return {stage for stage in ("prepare", "classifier", "train", "evaluate", "register")
            if f"Running stage '{stage}'" in output}


_pipeline_repo: list[tuple[Path, str]] = []


def pipeline_repo(tmp_path_factory) -> tuple[Path, str]:
    """A fresh tiny repository after its first `dvc repro`, made once; returns (repo, repro's
    output). The tests below add experiments to it, in file order."""
    if not _pipeline_repo:
        repo = fresh_git_repo(tmp_path_factory.mktemp("e2e") / "repo", TINY_PARAMS)
        _pipeline_repo.append((repo, _dvc(repo, "repro")))
    return _pipeline_repo[0]


def _mlflow(repo: Path) -> MlflowClient:
    """The workspace's own store: the default `sqlite:///mlflow.db` of its params.yaml."""
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _registered_versions(repo: Path) -> list:
    return _mlflow(repo).search_model_versions("name = 'dcgan-generator'")


def _wait_for_queue(repo: Path, queued: int, timeout_s: float = 1500) -> list[str]:
    """Wait until the queue has ended `queued` experiments and return the names of the
    successful ones; fail with a failed one's log, or, out of time, with every experiment's.
    Celery's file backend writes one result per ended task: a look at a folder every 2 s, not
    a dvc start (~1.5 s of CPU) each time, and no wait for the worker's exit."""
    results = repo / ".dvc" / "tmp" / "exps" / "celery" / "result"
    deadline = time.monotonic() + timeout_s
    while _ended_tasks(results) < queued:
        if time.monotonic() > deadline:
            pytest.fail(f"the queue ended {_ended_tasks(results)} of {queued} experiments in "
                        f"{timeout_s:.0f} s\n{_queue_logs(repo)}")
        time.sleep(2)
    rows = [line.split() for line in _dvc(repo, "queue", "status").splitlines()]
    # Task  Name  Created (`02:16 AM`: two words)  Status
    tasks = {row[1]: row[-1] for row in rows
             if len(row) >= 4 and row[-1] in ("Queued", "Running", "Success", "Failed")}
    failed = [name for name, status in tasks.items() if status == "Failed"]
    assert not failed, _dvc(repo, "queue", "logs", failed[0])[-5000:]
    assert set(tasks.values()) == {"Success"}, tasks
    return sorted(tasks)


def _ended_tasks(results: Path) -> int:
    ended = 0
    for result in results.glob("celery-task-meta-*"):
        with contextlib.suppress(OSError, ValueError):  # being written
            ended += json.loads(result.read_text())["status"] in ("SUCCESS", "FAILURE")
    return ended


def _queue_logs(repo: Path) -> str:
    """The last lines of each queued experiment's log and of the queue's worker, and what the
    session's Ray has free: what a person would look at when a queue does not end."""
    import ray

    logs = sorted((repo / ".dvc" / "tmp" / "exps").glob("*/*/*.out")) + sorted(
        (repo / ".dvc" / "tmp" / "exps" / "celery").glob("*.out"))
    tails = [f"--- {log.relative_to(repo)}\n{log.read_text(errors='replace')[-3000:]}"
             for log in logs]
    return "\n".join([*tails, f"Ray: {ray.available_resources()} free of "
                               f"{ray.cluster_resources()}"])


def _queued_sweep_lands_in_the_workspace_store(repo: Path) -> list[str]:
    """`dvc exp run --queue` with a grid, `dvc queue start -j 1`: both experiments run in
    temporary copies; their runs and model versions appear in the workspace's store, tagged
    with the DVC experiment and its baseline commit. Returns the experiments' names."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
    versions_before = len(_registered_versions(repo))
    _dvc(repo, "exp", "run", "--queue", "-S", "train.lr_d=0.0001,0.0003")
    try:
        _dvc(repo, "queue", "start", "-j", "1")  # SQLite takes one writer (README)
        names = _wait_for_queue(repo, queued=2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=stage_env(repo),
                       capture_output=True, timeout=120)
    assert len(names) == 2

    client = _mlflow(repo)
    runs = {run.data.tags.get("dvc.exp_name"): run for run in client.search_runs(
        [client.get_experiment_by_name("dcgan").experiment_id])}
    for name in names:
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc.baseline_rev"] == head
        assert run.data.tags["mlflow.source.git.commit"] == head
        # Named by what differs from the commit; described after evaluation.
        assert run.info.run_name.startswith(f"{name}: ") and "lr_d=0.000" in run.info.run_name
        assert "FID " in run.data.tags["mlflow.note.content"]
        assert run.data.metrics["fid"] > 0 and "train/loss_d" in run.data.metrics
        assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {runs[n].data.params["train.lr_d"] for n in names} == {"0.0001", "0.0003"}
    versions = _registered_versions(repo)
    assert len(versions) == versions_before + 2
    assert {v.tags.get("dvc.exp_name") for v in versions} >= set(names)
    # Nothing was left behind in the deleted copies' place.
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    return names


def _compare_the_sweep(repo: Path, names: list[str]) -> None:
    """`python -m pipeline compare --dvc-exp ...`: one image, one table for the sweep."""
    result = subprocess.run(
        [*BACKGROUND_NICE, sys.executable, "-m", "pipeline", "compare", "--dvc-exp", *names,
         "--out", "reports/sweep.png", "--table", "reports/sweep.md"],
        cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (repo / "reports" / "sweep.md").read_text()
    assert all(name in table for name in names)
    assert "param.train.lr_d" in table and re.search(r"\|\s*fid\s*\|", table), table
    with Image.open(repo / "reports" / "sweep.png") as image:
        # Two panels of 4 x 4 images of 32 px (138 px), enlarged three times, 8 px apart.
        assert image.width == 2 * 3 * 138 + 8


def test_dvc_repro_experiments_metrics_and_plots(ray_cluster, tmp_path_factory):
    repo, first = pipeline_repo(tmp_path_factory)
    assert _ran(first) == {"prepare", "classifier", "train", "evaluate", "register"}
    missing = [path for path in _declared_outputs(repo) if not (repo / path).exists()]
    assert not missing, f"dvc repro did not produce {missing}"
    assert json.loads((repo / "reports/registry.json").read_text())["version"]
    assert "Data and pipelines are up to date." in _dvc(repo, "repro")

    # An experiment that changes train.epochs (and lr_g) reruns train and what follows only.
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first run")
    experiment = _dvc(repo, "exp", "run", "-S", "train.epochs=2", "-S", "train.lr_g=0.0001")
    assert _ran(experiment) == {"train", "evaluate", "register"}
    assert "Stage 'prepare' didn't change, skipping" in experiment
    assert json.loads((repo / "reports/train_run.json").read_text())["epochs"] == 2
    table = json.loads(_dvc(repo, "exp", "show", "--json", "--no-pager"))
    experiments = [rev for baseline in table for group in baseline.get("experiments") or []
                   for rev in group["revs"]]
    assert len(experiments) == 1
    data = experiments[0]["data"]
    train_params = data["params"]["params.yaml"]["data"]["train"]
    assert (train_params["epochs"], train_params["lr_g"]) == (2, 0.0001)
    # The experiment commit holds its metrics (they are not git-ignored), so runs compare.
    assert data["metrics"]["metrics/evaluate.json"]["data"]["fid_classifier"] >= 0
    assert experiments[0]["name"] in _dvc(repo, "exp", "show", "--csv")
    # Its MLflow run says which experiment it is and what differs from the commit.
    run_id = json.loads((repo / "reports/train_run.json").read_text())["mlflow_run_id"]
    run = _mlflow(repo).get_run(run_id)
    assert run.data.tags["dvc.exp_name"] == experiments[0]["name"]
    assert run.info.run_name == f"{experiments[0]['name']}: epochs=2 lr_g=0.0001"

    # What a person reads: metrics fit one screen (a full-width terminal: 240 x 40), and
    # experiments compare in 160 columns (below).
    metrics = _dvc(repo, "metrics", "show")
    assert "fid_classifier" in metrics and "val_accuracy" in metrics
    assert len(metrics.splitlines()) <= 40 and max(map(len, metrics.splitlines())) <= 240
    assert not any(noise in metrics for noise in ("sha256", "run_id", "/tmp/", "classes."))

    names = _queued_sweep_lands_in_the_workspace_store(repo)
    _compare_the_sweep(repo, names)
    # The sweep side by side as the README shows it: what was swept and the headline metrics.
    shown = _dvc(repo, "exp", "show", "--no-pager", "--drop", ".*", "--keep", SWEEP_COLUMNS,
                 columns=160)
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 160 and "…" not in shown, shown
    assert "fid_classifier" in shown and "train.lr_d" in shown and "train.epochs" in shown
    assert all(name in shown for name in names)
    _dvc(repo, "plots", "show")
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "Training losses" in html
    assert "loss_d" in html
    assert "Classifier FID while training" in html  # reports/train_quality.csv


def test_the_mlflow_ui_shows_a_runs_sample_grid_loss_and_fid_charts(ray_cluster,
                                                                     tmp_path_factory):
    """The real UI in a real browser (Debian's headless Chromium): the run's page shows its
    sample grid, its loss charts and its FID chart; its overview, the description. (Not
    niced: a starved browser would time out.)"""
    if find_chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): UI not checked")
    repo, _ = pipeline_repo(tmp_path_factory)
    tmp_path = tmp_path_factory.mktemp("ui")
    tabs = ("model-metrics", "overview")
    result = subprocess.run(
        [sys.executable, "-m", "devtools.ui_screenshot", "--backend-store-uri",
         f"sqlite:///{repo / 'mlflow.db'}", "--tab", *tabs, "--out", str(tmp_path / "ui.png")],
        cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=600,
    )
    print(result.stdout)  # the screenshots' paths, for a person to look at
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    pages = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [page["screenshot"] for page in pages] == [str(tmp_path / f"ui_{tab}.png")
                                                      for tab in tabs]
    for page in pages:
        assert all(page["found"].values()), page
        with Image.open(page["screenshot"]) as image:
            # A rendered page, not a blank one: many colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100


def _labelled_folder(root: Path, classes: int = 3, per_class: int = 40) -> Path:
    """A user's photos in one sub-folder per class; random pixels, so that no classifier can
    tell the classes apart (the weakest extractor there is)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def test_a_users_labelled_folder_runs_end_to_end_with_a_weak_classifier_named(
    ray_cluster, tmp_path_factory
):
    """The default classifier params on someone's own labelled folder: the classifier misses
    the 0.98 bar (random pixels), and instead of stopping the DAG, every stage runs and the
    FID is named weak in the evaluation, the run's description and the registered version."""
    photos = _labelled_folder(tmp_path_factory.mktemp("photos") / "photos")
    small = {key: value for key, value in TINY_PARAMS.items() if key != "classifier"}
    repo = fresh_git_repo(tmp_path_factory.mktemp("byo") / "repo", {
        **small, "data": {**TINY_PARAMS["data"], "source": str(photos), "image_size": 32,
                          "channels": 3, "samples_per_shard": 50},
        "train": {**TINY_PARAMS["train"], "batch_size": 16},  # 108 train images
        "eval": {"num_samples": 12, "batch_size": 12, "kid_subset_size": 6},
    })
    defaults = yaml.safe_load((repo / "params.yaml").read_text())["classifier"]
    assert defaults["min_val_accuracy"] == 0.98 and defaults["on_below_min"] == "auto"
    output = _dvc(repo, "repro")
    assert _ran(output) == {"prepare", "classifier", "train", "evaluate", "register"}

    classifier = json.loads((repo / "models/classifier/spec.json").read_text())
    assert classifier["val_accuracy"] < 0.98
    assert classifier["weak_reason"].startswith("val accuracy ")
    evaluation = json.loads((repo / "reports/evaluation.json").read_text())
    assert evaluation["weak_classifier_reason"] == classifier["weak_reason"]
    assert evaluation["feature_extractor"] == "classifier"
    run_id = json.loads((repo / "reports/train_run.json").read_text())["mlflow_run_id"]
    description = _mlflow(repo).get_run(run_id).data.tags["mlflow.note.content"]
    assert f"(classifier, WEAK: {classifier['weak_reason']}" in description
    (version,) = _registered_versions(repo)
    assert version.tags["weak_classifier"] == classifier["weak_reason"]
