"""What MLflow shows of a run, without a server: where the store of a DVC experiment copy is,
the run's name, params and tags, metric names and steps, the description, readable grids."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core import provenance, tracking
from pipeline.core.config import MlflowConfig, load_config
from pipeline.core.layout import Layout, workspace_root
from pipeline.core.records import Evaluation
from pipeline.data.grids import display_copy
from pipeline.evaluate import mlflow_log
from pipeline.train import mlflow_run

REPO_ROOT = Path(__file__).resolve().parents[1]


def _experiment_copy(workspace: Path) -> Path:
    """Where `dvc exp run --queue` (DVC 3.67) runs an experiment: a copy inside the workspace."""
    copy = workspace / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    return copy


def test_a_dvc_experiment_copy_uses_the_stores_of_its_workspace(tmp_path, monkeypatch):
    workspace = tmp_path / "repo"
    copy = _experiment_copy(workspace)
    default = MlflowConfig(tracking_uri="sqlite:///mlflow.db")

    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert workspace_root(copy) == copy.resolve()  # by hand: the root is the root
    assert tracking.resolve_tracking_uri(default, copy) == f"sqlite:///{copy.resolve()}/mlflow.db"

    monkeypatch.setenv("DVC_ROOT", str(workspace))  # what DVC sets for the stage commands
    assert workspace_root(copy) == workspace.resolve()
    assert tracking.resolve_tracking_uri(default, copy) == (
        f"sqlite:///{workspace.resolve()}/mlflow.db"
    )
    layout = Layout(copy)
    assert layout.root == copy.resolve()  # outputs stay in the copy, DVC collects them there
    assert layout.generator_weights == copy.resolve() / "models/generator.pt"
    assert layout.ray_storage_dir == workspace.resolve() / ".ray_storage"
    assert layout.feature_cache_dir == workspace.resolve() / ".cache/features"
    # Absolute paths and servers are what they say.
    server = MlflowConfig(tracking_uri="http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(server, copy) == "http://127.0.0.1:5000"
    absolute = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/elsewhere.db")
    assert tracking.resolve_tracking_uri(absolute, copy) == f"sqlite:///{tmp_path}/elsewhere.db"


def test_a_dvc_root_that_does_not_hold_the_stage_changes_nothing(tmp_path, monkeypatch):
    # `dvc repro` sets DVC_ROOT to the repository itself; a stale one points anywhere.
    repo, other = tmp_path / "repo", tmp_path / "other"
    repo.mkdir()
    other.mkdir()
    for dvc_root in (repo, other, tmp_path):
        monkeypatch.setenv("DVC_ROOT", str(dvc_root))
        assert workspace_root(repo) == repo.resolve()
        assert Layout(repo).shared_root == repo.resolve()


def test_the_dvc_experiment_comes_from_dvcs_environment():
    assert provenance.dvc_experiment({}) is None
    experiment = provenance.dvc_experiment(
        {"DVC_EXP_NAME": "comic-mean", "DVC_EXP_BASELINE_REV": "a" * 40}
    )
    assert experiment is not None
    assert experiment.tags() == {"dvc.exp_name": "comic-mean", "dvc.baseline_rev": "a" * 40}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def committed_repo(tmp_path) -> Path:
    """A git repository holding the project's params.yaml, committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "t@example.invalid")
    _git(repo, "config", "user.name", "t")
    _git(repo, "add", "params.yaml")
    _git(repo, "commit", "-q", "-m", "params")
    return repo


def test_a_run_is_named_by_what_differs_from_the_committed_params(committed_repo, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    layout = Layout(committed_repo)
    params = committed_repo / "params.yaml"

    same = mlflow_run.identity(load_config(params), layout, "dcgan-20261130-ray")
    # Nothing differs: the commit's baseline, named by its commit (the Ray run name is a tag).
    head = _git(committed_repo, "rev-parse", "HEAD")
    assert same.name == f"baseline @ {head[:7]}"
    assert same.tags["ray_run_name"] == "dcgan-20261130-ray"
    # Few parameters: the UI prints them all above a run's sample grid.
    assert len(same.params) <= 12 and same.params["train.lr_g"] == 0.002

    # As `dvc exp run -S train.lr_g=0.0001 -S train.epochs=2` leaves params.yaml.
    changed = load_config(params, ["train.lr_g=0.0001", "train.epochs=2",
                                   "train.data_cache=host", "eval.num_samples=200"])
    monkeypatch.setenv("DVC_EXP_NAME", "comic-mean")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", _git(committed_repo, "rev-parse", "HEAD"))
    # As the stage calls it: auto workers resolved (1 x 2 here), the request as it was.
    resolved = dataclasses.replace(changed, train=dataclasses.replace(
        changed.train, num_workers=1, cpus_per_worker=2))
    run = mlflow_run.identity(resolved, layout, "dcgan-20261130-ray", changed)
    # Only what training reads; eval.num_samples does not shape the training run.
    assert run.name == "comic-mean: epochs=2 lr_g=0.0001 data_cache=host"
    # The parameters that shape a run, plus what changed; no paths, retries or MLflow settings.
    assert run.params["train.lr_g"] == 0.0001 and run.params["train.epochs"] == 2
    assert run.params["train.data_cache"] == "host"
    assert run.params["train.global_batch"] == 64
    assert not any(key.startswith(("mlflow.", "register.", "eval.", "classifier."))
                   for key in run.params)
    assert not {"train.storage_path", "train.max_failures", "train.log_every_steps"} & set(
        run.params)
    # Who, what and which commit fill the UI's columns; the DVC experiment is named.
    head = _git(committed_repo, "rev-parse", "HEAD")
    assert run.tags["mlflow.source.git.commit"] == head
    assert run.tags["mlflow.source.git.branch"] == "main"
    assert run.tags["mlflow.source.name"] == "stages/train.py"
    assert run.tags["mlflow.user"]
    assert run.tags["dvc.exp_name"] == "comic-mean" and run.tags["dvc.baseline_rev"] == head
    assert run.tags["ray_run_name"] == "dcgan-20261130-ray"
    # The full config is the artifact: every key, including those not logged as params.
    assert "storage_path:" in mlflow_run.config_yaml(changed)
    assert "num_samples: 200" in mlflow_run.config_yaml(changed)


def test_a_long_name_is_cut_and_a_run_outside_git_still_has_a_name(tmp_path):
    changes = {f"train.key_{index}": index for index in range(40)}
    name = mlflow_run.run_name(changes, None, "fallback")
    assert len(name) == mlflow_run.NAME_MAX_CHARS and name.endswith("…")
    assert mlflow_run.committed_config(Layout(tmp_path)) is None
    assert "mlflow.source.git.commit" not in provenance.source_tags(tmp_path, "stages/train.py")


def test_remote_urls_lose_their_credentials_and_local_paths_are_not_tagged():
    assert provenance.shareable_url("https://user:token@github.com/org/repo.git") == (
        "https://github.com/org/repo.git"
    )
    assert provenance.shareable_url("git@github.com:org/repo.git") == "git@github.com:org/repo.git"
    assert provenance.shareable_url("/tmp/workspace") is None
    assert provenance.shareable_url(None) is None


def test_training_metrics_are_grouped_and_stepped_by_images_seen():
    rows = [{"step": 10, "epoch": 1, "loss_d": 1.2, "loss_g": 0.8, "d_real": 0.6,
             "d_fake": 0.4, "augment_p": 0.25, "ada_rt": 0.5, "images_per_s": 250.0}]
    # 1 worker x 64 and 2 workers x 32 have seen the same images after 10 steps.
    assert mlflow_run.metric_rows(rows, 64) == [{
        "step": 640, "train/loss_d": 1.2, "train/loss_g": 0.8, "train/d_real": 0.6,
        "train/d_fake": 0.4, "train/augment_p": 0.25, "train/ada_rt": 0.5,
        "system/images_per_s": 250.0,
    }]
    assert mlflow_run.GRID_KEY == "train/samples"


def test_grids_are_enlarged_to_be_read_with_sharp_pixels():
    images = torch.rand(64, 1, 32, 32) * 2 - 1
    grid = mlflow_run.grid_image(images)
    assert grid.size == (3 * 274, 3 * 274)  # 8 x 8 images of 32 px: 274 px, three times
    pixels = np.asarray(grid)
    # Nearest neighbour: every source pixel became a 3 x 3 block of one value.
    assert (pixels[::3, ::3] == pixels[1::3, 1::3]).all()
    assert (pixels[::3, ::3] == pixels[2::3, 2::3]).all()
    assert display_copy(Image.new("L", (530, 530))).size == (1060, 1060)  # 64 px images: 2x
    large = Image.new("RGB", (1042, 1042))  # 8 x 8 of 128 px: big enough already
    assert display_copy(large).size == (1042, 1042)


def _evaluation(**overrides) -> Evaluation:
    values = dict(
        feature_extractor="classifier", feature_extractor_sha256="ab" * 32, num_samples=500,
        num_real_samples=500, floor_num_samples=500, kid_subset_size=100, generator_steps=1400,
        scores={"fid_classifier": 54.857, "fid_classifier_floor": 4.49, "kid_classifier": 0.05,
                "classes_hit": 10, "class_entropy": 0.96},
        mode_collapse=False, class_histogram=[50] * 10,
    )
    return Evaluation(**{**values, **overrides})


def test_evaluation_metrics_have_a_headline_fid_and_settings_are_tags():
    record = _evaluation()
    metrics = mlflow_log.metrics(record)
    assert metrics["fid"] == metrics["eval/fid_classifier"] == 54.857
    assert all(key == "fid" or key.startswith("eval/") for key in metrics)
    assert not {"num_samples", "eval/num_samples", "kid_subset_size"} & set(metrics)
    tags = mlflow_log.tags(record)
    assert tags["fid.extractor"] == "classifier"
    assert tags["eval.num_samples"] == "500" and tags["eval.kid_subset_size"] == "100"
    assert tags["eval.mode_collapse"] == "false"
    assert "fid" not in mlflow_log.metrics(_evaluation(feature_extractor="none", scores={}))


def test_the_description_says_what_a_person_looks_for_in_one_line():
    params = {"train.epochs": "20", "train.lr_g": "0.0002", "train.lr_d": "0.0001",
              "train.num_workers": "2", "train.batch_size": "32"}
    run_tags = {"mlflow.source.git.commit": "c669a84" + "0" * 33, "dvc.exp_name": "comic-mean"}
    text = mlflow_log.description(_evaluation(), params, run_tags)
    assert "\n" not in text
    for part in ("20 epochs", "lr_g 0.0002, lr_d 0.0001", "2 workers × batch 32",
                 "FID 54.86 vs floor 4.49 (classifier, N=500)", "no mode collapse (10/10 classes)",
                 "commit c669a84", "dvc exp comic-mean"):
        assert part in text, (part, text)
    collapsed = _evaluation(mode_collapse=True, scores={"fid_classifier": 90.0, "classes_hit": 3})
    one_worker = {**params, "train.num_workers": "1"}
    text = mlflow_log.description(collapsed, one_worker, {})
    assert "MODE COLLAPSE (3/10 classes)" in text and "1 worker × batch 32" in text
    unmeasured = _evaluation(feature_extractor="none", scores={}, mode_collapse=None)
    assert "no FID" in mlflow_log.description(unmeasured, {}, {})


def test_the_experiment_opens_in_the_model_training_view(tmp_path, monkeypatch):
    """MLflow 3 opens an experiment of no declared kind in its GenAI (traces) view; the first
    run declares it a model-training one, and a kind someone set is kept."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, experiment_id = tracking.start_run(uri, "kinds", {"a": 1})
    client = MlflowClient(tracking_uri=uri)
    kind = client.get_experiment(experiment_id).tags[tracking.TAG_EXPERIMENT_KIND]
    assert kind == "custom_model_development"
    client.set_experiment_tag(experiment_id, tracking.TAG_EXPERIMENT_KIND, "genai_development")
    tracking.start_run(uri, "kinds", {"a": 2})
    assert client.get_experiment(experiment_id).tags[tracking.TAG_EXPERIMENT_KIND] == (
        "genai_development")
