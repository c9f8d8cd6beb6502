"""Stand-ins for what train and evaluate leave behind, for registry and compare tests.

A tiny generator with random weights, its spec, a finished MLflow training run holding the
params, reports/evaluation.json with chosen scores, and data/stats.json: exactly the records
the register stage reads, so these tests do not depend on training running.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import dataset_stats

from pipeline.core.config import load_config, to_flat_dict
from pipeline.core.layout import Layout
from pipeline.core.records import Evaluation, GeneratorRecord, TrainRun
from pipeline.core.tracking import end_run, set_description, start_run
from pipeline.models.dcgan import Generator, GeneratorSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = GeneratorSpec(nz=8, ngf=4, image_size=16, channels=1)
EXTRACTOR_SHA = "e" * 64
DATASET_SHA = "d" * 64


def description_of(seed: int) -> str:
    """The start of the run description that `make_workspace` writes for `seed`."""
    return f"tiny generator of seed {seed}:"


def tiny_generator(seed: int) -> Generator:
    """A tiny generator with PyTorch's default init (outputs spread enough to see in a PNG)."""
    torch.manual_seed(seed)
    return Generator(SPEC.nz, SPEC.ngf, SPEC.image_size, SPEC.channels).eval()


def make_workspace(
    root: Path,
    tracking_uri: str,
    *,
    seed: int,
    fid: float,
    experiment: str = "registry-tests",
    overrides: tuple[str, ...] = (),
    extractor_sha: str = EXTRACTOR_SHA,
    num_samples: int = 100,
    classes_hit: int = 10,
) -> dict:
    """Write an evaluated generator under `root` (models/, reports/, data/, params.yaml) and a
    finished training run; return {"run_id", "generator", "overrides"}."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    overrides = (
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment={experiment}",
        *overrides,
    )
    cfg = load_config(root / "params.yaml", overrides)
    generator = tiny_generator(seed)
    (root / "models").mkdir(exist_ok=True)
    weights = root / "models" / "generator.pt"
    torch.save(generator.state_dict(), weights)
    layout = Layout(root)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    GeneratorRecord(spec=SPEC.to_dict(), steps=10, images_seen=640, sha256=sha).save(layout)

    run_id, experiment_id = start_run(
        tracking_uri, experiment, to_flat_dict(cfg), run_name=f"seed-{seed}"
    )
    set_description(tracking_uri, run_id, f"{description_of(seed)} FID {fid}")  # as evaluate
    end_run(tracking_uri, run_id)
    TrainRun(
        mlflow_run_id=run_id, mlflow_experiment_id=experiment_id, tracking_uri=tracking_uri,
        ray_run_name=f"ray-seed-{seed}", ray_storage_path=str(root / ".ray_storage"),
        final_checkpoint="", steps=10, epochs=1, steps_per_epoch=10, images_seen=640,
        world_size=2, generator_sha256=sha, wall_s=1.0,
    ).save(layout)
    scores = {
        "fid_classifier": fid,
        "kid_classifier": fid / 100,
        "fid_classifier_floor": 1.5,
        "classifier_score": 9.0 - fid / 10,
        "classes_hit": classes_hit,
    }
    histogram = [num_samples // classes_hit if k < classes_hit else 0 for k in range(10)]
    Evaluation(
        feature_extractor="classifier", feature_extractor_sha256=extractor_sha,
        num_samples=num_samples, num_real_samples=num_samples, floor_num_samples=num_samples,
        kid_subset_size=50, generator_steps=10, scores=scores,
        mode_collapse=classes_hit < 8, class_histogram=histogram,
    ).save(layout)
    dataset_stats(dataset_sha256=DATASET_SHA).save(layout)
    return {"run_id": run_id, "generator": generator, "overrides": overrides, "config": cfg}


def run_cli(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <args>` as a user would, in `cwd`; fail the test with its output if asked."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def register_stage(
    root: Path, overrides: tuple[str, ...], check: bool = True
) -> subprocess.CompletedProcess:
    """`python stages/register.py -S ...` run in `root` (the stage reads its relative paths)."""
    args = [str(REPO_ROOT / "stages" / "register.py")]
    for override in overrides:
        args += ["-S", override]
    return run_cli(args, root, check=check)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines a failed command printed."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def register_in_process(root: Path, workspace: dict, tracking_uri: str):
    """What the register stage does, without a new interpreter (setup for other tests)."""
    from pipeline.registry.register import register_generator

    return register_generator(workspace["config"], Layout(root), tracking_uri)
