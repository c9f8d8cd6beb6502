"""`import-run` against a real MLflow store (SQLite, no server) holding runs that the train
stage's own `keep_outputs` logged: what comes in, what params.yaml says afterwards, and that
a failed check changes nothing. The whole way (a job on a 2-node cluster, dvc.lock, `dvc repro`
without train): tests/test_cluster.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, dataset_stats

from pipeline.core import tracking
from pipeline.core.config import Config, load_config, to_flat_dict
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.core.layout import Layout
from pipeline.core.records import GeneratorRecord, TrainRun
from pipeline.registry.import_run import import_run
from pipeline.train.train import keep_outputs

# What the job's `-S` overrides changed against params.yaml: one hyperparameter, the server,
# and where the cluster found its shards.
JOB_OVERRIDES = {"train.epochs": 1, "train.shards": "file:///mnt/shared/shards",
                 "mlflow.tracking_uri": "http://mlflow.cluster:5000"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _workspace(root: Path) -> Layout:
    """A clone after `dvc repro prepare`: params.yaml, dvc.yaml, data/stats.json."""
    root.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, root / name)
    layout = Layout(root)
    dataset_stats().save(layout)
    return layout


def _job_outputs(root: Path, dataset_sha256: str) -> Layout:
    """What the train stage leaves in a job's directory, small but of the right kinds."""
    layout = Layout(root)
    layout.generator_weights.parent.mkdir(parents=True)
    layout.generator_weights.write_bytes(b"generator weights " * 64)
    layout.raw_generator_weights.write_bytes(b"raw generator weights " * 64)
    GeneratorRecord(spec={"nz": 16}, steps=17, images_seen=4352,
                    sha256=sha256_file(layout.generator_weights), ema_half_life_images=1000,
                    raw_sha256=sha256_file(layout.raw_generator_weights)).save(layout)
    layout.train_log.parent.mkdir(parents=True)
    layout.train_log.write_text("step,loss_d,loss_g\n10,1.2,0.9\n")
    layout.train_quality.write_text("step,fid_classifier\n17,30.5\n")
    layout.train_grids_dir.mkdir(parents=True)
    (layout.train_grids_dir / "epoch_001.png").write_bytes(b"\x89PNG grid")
    return layout


def _log_run(store: str, tmp_path: Path, status: str = "FINISHED", job: str | None = None,
             dataset_sha256: str = "d" * 64, damage: bool = False, older: bool = False) -> str:
    """A train run as the stage logs it (params of the job, its outputs by `keep_outputs`)."""
    overrides = [f"{key}={value}" for key, value in JOB_OVERRIDES.items()]
    params = to_flat_dict(load_config(REPO_ROOT / "params.yaml", overrides))
    run_id, experiment_id = tracking.start_run(store, "dcgan", params, tags={"stage": "train"})
    if job:
        tracking.set_tags(store, run_id, {tracking.JOB_TAG: job})
    job_dir = _job_outputs(tmp_path / f"job-{run_id}", dataset_sha256)
    generator = GeneratorRecord.load(job_dir)
    TrainRun(mlflow_run_id=run_id, mlflow_experiment_id=experiment_id, tracking_uri=store,
             ray_run_name="dcgan-x", ray_storage_path="/mnt/shared/ray", final_checkpoint="/c",
             steps=17, epochs=1, steps_per_epoch=17, images_seen=4352, world_size=2,
             generator_sha256=generator.sha256, wall_s=9.0, dataset_sha256=dataset_sha256,
             ray_job_submission_id=job).save(job_dir)
    if damage:  # an upload that went wrong: the weights no longer match their record
        job_dir.generator_weights.write_bytes(b"truncated")
    if older:  # what the train stage logged before import-run: no log, no grids
        tracking.log_artifact(store, run_id, job_dir.train_run)
        for path in (job_dir.generator_weights, job_dir.generator_record):
            tracking.log_artifact(store, run_id, path, "models")
    else:
        keep_outputs(store, run_id, job_dir)
    tracking.end_run(store, run_id, status)
    return run_id


def _snapshot(layout: Layout) -> dict[str, bytes]:
    return {str(p.relative_to(layout.root)): p.read_bytes()
            for p in sorted(layout.root.rglob("*")) if p.is_file()}


def test_a_run_comes_in_checked_with_the_params_it_trained_with(store, tmp_path):
    layout = _workspace(tmp_path / "repo")
    run_id = _log_run(store, tmp_path)

    done = import_run(layout, store, run_id, commit=False)

    generator = GeneratorRecord.load(layout)
    assert generator.verified_weights(layout) == layout.generator_weights
    train_run = TrainRun.load(layout)
    assert train_run.mlflow_run_id == run_id and train_run.generator_sha256 == generator.sha256
    assert layout.train_log.read_text().startswith("step,loss_d")
    assert (layout.train_grids_dir / "epoch_001.png").is_file()
    assert layout.metrics("train").is_file()  # `dvc metrics show` has the train numbers
    # params.yaml now says what trained it, except where the cluster kept its shards.
    cfg = load_config(layout.path("params.yaml"))
    assert cfg.train.epochs == 1 and cfg.mlflow.tracking_uri == "http://mlflow.cluster:5000"
    assert cfg.train.shards == ""
    assert set(done.params_changed) == {"train.epochs", "mlflow.tracking_uri"}
    assert done.params_kept == {"train.shards": ("", "file:///mnt/shared/shards")}
    assert not done.dvc_committed


def test_a_run_is_found_by_the_job_that_ran_it(store, tmp_path):
    layout = _workspace(tmp_path / "repo")
    run_id = _log_run(store, tmp_path, job="dcgan-20261130-0300")
    assert import_run(layout, store, job="dcgan-20261130-0300", commit=False).run_id == run_id
    with pytest.raises(UserError, match="no run of job 'dcgan-other'"):
        import_run(layout, store, job="dcgan-other", commit=False)


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"damage": True}, "models/generator.pt does not match the SHA-256 in its "
                           "models/generator.json"),
        ({"dataset_sha256": "e" * 64}, "trained on dataset eeeeeeeeeeee, but .* describes "
                                       "dddddddddddd"),
        ({"status": "FAILED"}, "is FAILED, not FINISHED"),
        ({"older": True}, "has no artifact models/generator_raw.pt"),
    ],
    ids=["damaged generator", "other data", "unfinished run", "older train stage"],
)
def test_a_run_that_fails_a_check_changes_nothing(store, tmp_path, run, message):
    layout = _workspace(tmp_path / "repo")
    before = _snapshot(layout)
    run_id = _log_run(store, tmp_path, **run)
    with pytest.raises(UserError, match=message):
        import_run(layout, store, run_id, commit=False)
    assert _snapshot(layout) == before


def test_the_wrong_store_is_named_and_not_created(store, tmp_path):
    layout = _workspace(tmp_path / "repo")
    missing = tmp_path / "mlflow.db"
    with pytest.raises(UserError, match=r"no MLflow store at .*: pass --tracking-uri"):
        import_run(layout, f"sqlite:///{missing}", "0" * 32, commit=False)
    assert not missing.exists()
    with pytest.raises(UserError, match="is not in the tracking store"):
        import_run(layout, store, "0" * 32, commit=False)


def test_the_record_of_a_run_keeps_what_import_needs():
    """A TrainRun written before the import existed still loads (new fields are optional)."""
    old = {f.name: 0 for f in dataclasses.fields(TrainRun)
           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    record = TrainRun.from_dict(old)
    assert record.dataset_sha256 is None and record.ray_job_submission_id is None


def test_every_refusal_is_a_row_of_the_troubleshooting_table(store, tmp_path):
    from readme_helpers import assert_in_troubleshooting

    layout = _workspace(tmp_path / "repo")
    for run in ({"dataset_sha256": "e" * 64}, {"status": "RUNNING"}, {"older": True}):
        with pytest.raises(UserError) as refused:
            import_run(layout, store, _log_run(store, tmp_path, **run), commit=False)
        assert_in_troubleshooting(str(refused.value))
    for uri, run_id in ((store, "0" * 32), (f"sqlite:///{tmp_path / 'none.db'}", "0" * 32)):
        with pytest.raises(UserError) as refused:
            import_run(layout, uri, run_id, commit=False)
        assert_in_troubleshooting(str(refused.value))


def test_the_command_says_what_came_in_and_what_changed(store, tmp_path):
    """`python -m pipeline import-run <run id>` as a user types it (here without dvc.lock)."""
    layout = _workspace(tmp_path / "repo")
    run_id = _log_run(store, tmp_path)
    command = [sys.executable, "-m", "pipeline", "import-run", "--tracking-uri", store,
               "--params", str(layout.path("params.yaml"))]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([*command, run_id, "--no-dvc-commit"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"imported run {run_id} (17 steps on 2 worker(s); generator "
                               "SHA-256 ")
    assert "  models/generator.pt" in lines and "  reports/train_log.csv" in lines
    default_epochs = Config().train.epochs
    assert f"params.yaml: train.epochs: {default_epochs} -> 1 (what the run trained with)" in lines
    assert lines[-1].startswith("not recorded in dvc.lock (--no-dvc-commit)")

    neither = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert neither.returncode == 1
    assert neither.stderr.splitlines() == ["error: give a run id or --job SUBMISSION_ID (one "
                                           "of the two)"]
