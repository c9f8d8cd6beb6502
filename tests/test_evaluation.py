"""The evaluate stage end to end: a tiny generator, the trained classifier, a real MLflow run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import stage_env
from PIL import Image

from pipeline.core import tracking
from pipeline.core.files import sha256_file
from pipeline.core.layout import Layout
from pipeline.core.records import TrainRun
from pipeline.models.dcgan import GeneratorSpec, build_generator

torch.set_num_threads(1)

EVAL_ARGS = ["-S", "eval.num_samples=200", "-S", "eval.batch_size=100",
             "-S", "eval.kid_subset_size=50"]


def run_evaluate(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**stage_env(repo), "TORCH_HOME": str(repo / "no_torch_home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "stages/evaluate.py", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eval_repo(featurized_repo, tmp_path_factory) -> tuple[Path, str, str]:
    """featurized_repo plus an untrained tiny generator and its training's MLflow run (SQLite),
    as the train stage leaves them. Yields (repo, tracking_uri, run_id)."""
    repo = tmp_path_factory.mktemp("evaluate") / "repo"
    shutil.copytree(featurized_repo, repo)
    torch.manual_seed(0)
    spec = GeneratorSpec(nz=16, ngf=8, image_size=32, channels=1)
    (repo / "models").mkdir(exist_ok=True)
    torch.save(build_generator(spec).state_dict(), repo / "models/generator.pt")
    (repo / "models/generator.json").write_text(json.dumps({
        "spec": spec.to_dict(), "steps": 0, "images_seen": 0,
        "sha256": sha256_file(repo / "models/generator.pt"),
    }))
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    run_id, experiment_id = tracking.start_run(uri, "dcgan", {"model.nz": 16}, run_name="tiny")
    TrainRun(
        mlflow_run_id=run_id, mlflow_experiment_id=experiment_id, tracking_uri=uri,
        ray_run_name="tiny", ray_storage_path="", final_checkpoint="", steps=0, epochs=1,
        steps_per_epoch=1, images_seen=0, world_size=1,
        generator_sha256=sha256_file(repo / "models/generator.pt"), wall_s=0.0,
    ).save(Layout(repo))
    return repo, uri, run_id


def test_evaluate_writes_metrics_with_floor_grids_and_logs_to_the_training_run(eval_repo):
    repo, uri, run_id = eval_repo
    result = run_evaluate(repo, *EVAL_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((repo / "reports/evaluation.json").read_text())
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    classifier_spec = json.loads((repo / "models/classifier/spec.json").read_text())

    assert record["feature_extractor"] == "classifier"
    assert record["feature_extractor_sha256"] == classifier_spec["sha256"]
    assert record["num_samples"] == record["floor_num_samples"] == 200
    # What people compare across experiments; the rest stays in the record.
    compared = ("fid_classifier", "fid_classifier_floor", "kid_classifier",
                "kid_classifier_floor", "class_coverage")
    assert metrics == {**{key: record["scores"][key] for key in compared},
                       "mode_collapse": record["mode_collapse"]}
    # an untrained generator is far from the data; two real splits are close
    assert 0 <= metrics["fid_classifier_floor"] < metrics["fid_classifier"]
    assert metrics["kid_classifier_floor"] < metrics["kid_classifier"]
    assert not any(key.startswith(("fid_inception", "kid_inception")) for key in metrics)
    scores = record["scores"]
    assert 1 <= scores["classes_hit"] <= 10 and isinstance(metrics["mode_collapse"], bool)
    assert scores["classifier_score"] >= 1.0

    side = 8 * (32 + 2) + 2  # 8 x 8 images of 32 px, 2 px padding
    assert Image.open(repo / "reports/samples.png").size == (side, side)
    assert Image.open(repo / "reports/reals.png").size == (side, side)
    assert Image.open(repo / "reports/interpolation.png").size == (10 * 34 + 2, side)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data
    # Scores under eval/ (one group of charts in the UI), the headline fid, settings as tags.
    assert logged.metrics["fid"] == pytest.approx(metrics["fid_classifier"])
    assert logged.metrics["eval/fid_classifier"] == pytest.approx(metrics["fid_classifier"])
    assert logged.metrics["eval/fid_classifier_floor"] == pytest.approx(
        metrics["fid_classifier_floor"])
    assert all(key == "fid" or key.startswith("eval/") for key in logged.metrics)
    assert logged.tags["fid.extractor"] == logged.tags["eval.feature_extractor"] == "classifier"
    assert logged.tags["eval.num_samples"] == "200"
    description = logged.tags["mlflow.note.content"]
    assert f"FID {metrics['fid_classifier']:.2f} vs floor" in description
    assert "mode collapse" in description.lower() and "\n" not in description
    # The final samples at the artifact root (the compare page shows those), enlarged.
    root = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples.png", "interpolation.png"} <= root
    # And as one image at one step (the generator's images seen), so its card opens on it.
    grids = [Path(a.path).name for a in client.list_artifacts(run_id, "images")
             if Path(a.path).name.startswith("eval~samples+step+") and a.path.endswith(".png")]
    assert len(grids) == 1 and grids[0].startswith("eval~samples+step+0+"), grids
    (repo / "downloaded").mkdir(exist_ok=True)
    shown = client.download_artifacts(run_id, "samples.png", str(repo / "downloaded"))
    assert Image.open(shown).size == (3 * side, 3 * side)
    artifacts = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    assert {"reals.png", "evaluation.json", "evaluate.json"} <= artifacts

    # Real features are cached (plain .npy) and reused: same numbers, no re-extraction.
    cached = sorted(p.name for p in (repo / ".cache/features").iterdir())
    assert len(cached) == 2 and all(name.endswith("-n200.npy") for name in cached)
    again = run_evaluate(repo, *EVAL_ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("from cache") == 2
    assert json.loads((repo / "reports/evaluation.json").read_text()) == record


def test_evaluate_without_any_extractor_still_reports_and_says_why(eval_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(eval_repo[0], repo)
    # As the classifier stage leaves an unlabelled source: no classifier, a record saying why.
    (repo / "models/classifier/weights.pt").unlink()
    (repo / "models/classifier/spec.json").write_text(
        json.dumps({"skipped": True, "reason": "the data source has no labels"}))

    asked = run_evaluate(repo, *EVAL_ARGS, "-S", "eval.feature_extractor=inception")
    assert asked.returncode == 1
    last = asked.stderr.strip().splitlines()[-1]
    assert last.startswith("error: FID Inception weights not found at ")
    assert "pt_inception-2015-12-05-6726825d.pth" in last

    result = run_evaluate(repo, *EVAL_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((repo / "reports/evaluation.json").read_text())
    assert record["feature_extractor"] == "none"
    assert "no Inception weights" in record["fid_skipped_reason"]
    assert "no labels" in record["fid_skipped_reason"]
    assert record["scores"] == {}
    assert record["num_samples"] == 200
    assert (repo / "reports/samples.png").exists() and (repo / "reports/reals.png").exists()
