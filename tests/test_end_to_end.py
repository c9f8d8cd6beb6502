"""The whole DAG with real DVC on a fresh git repo (a copy of this one, tiny params):
`dvc repro` makes every output, a second one does nothing, `dvc exp run -S train.epochs=2
-S train.lr_g=0.0001` reruns train and what follows only and records a comparable experiment, and
`dvc metrics show` / `dvc plots show` read what the stages wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import fresh_git_repo, git, stage_env

pytestmark = pytest.mark.slow
COMPARE_DROP = "^(data|models|reports)/"  # as in the README's "Comparing runs"

# mnist5k at 32 px (the real data), but small models, one short epoch and a small evaluation.
TINY_PARAMS = {
    "data": {"num_processes": 1},
    "model": {"nz": 16, "ngf": 8, "ndf": 8},
    "train": {"num_workers": 1, "batch_size": 256, "epochs": 1, "loader_workers": 0,
              "checkpoint_every_steps": 1000, "max_failures": 0},
    "classifier": {"epochs": 1, "batch_size": 256, "min_val_accuracy": 0.0},
    "eval": {"num_samples": 100, "batch_size": 100, "kid_subset_size": 50},
}


def _dvc(repo: Path, *args: str, columns: int = 200) -> str:
    """Run `dvc ARGS` in `repo` as a user would, in a terminal `columns` wide; return its
    output, fail with it on error."""
    env = {**stage_env(repo), "OMP_NUM_THREADS": "1", "COLUMNS": str(columns)}
    env.pop("RAY_ADDRESS", None)  # train starts its own local Ray, as on a laptop
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-5000:]}"
    return output


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


def test_dvc_repro_experiments_metrics_and_plots(tmp_path):
    repo = fresh_git_repo(tmp_path / "repo", TINY_PARAMS)

    first = _dvc(repo, "repro")
    assert _ran(first) == {"prepare", "classifier", "train", "evaluate", "register"}
    missing = [path for path in _declared_outputs(repo) if not (repo / path).exists()]
    assert not missing, f"dvc repro did not produce {missing}"
    assert json.loads((repo / "reports/registry.json").read_text())["version"]
    assert "Data and pipelines are up to date." in _dvc(repo, "repro")

    # An experiment that changes train.epochs (and lr_g) reruns train and what follows only.
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first run")
    experiment = _dvc(repo, "exp", "run", "-S", "train.epochs=2", "-S", "train.lr_g=0.0001")
    assert _ran(experiment) == {"train", "evaluate", "register"}, experiment[-3000:]
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

    # What a person reads: metrics fit one screen (a full-width terminal: 240 x 40), and two
    # experiments compare in 160 columns.
    metrics = _dvc(repo, "metrics", "show")
    assert "fid_classifier" in metrics and "val_accuracy" in metrics
    assert len(metrics.splitlines()) <= 40 and max(map(len, metrics.splitlines())) <= 240
    assert not any(noise in metrics for noise in ("sha256", "run_id", "/tmp/", "classes."))
    _dvc(repo, "exp", "run", "-S", "train.lr_d=0.0001")
    # The README's comparison command: changed metrics and params, without the hashes of the
    # files that every experiment rewrites.
    shown = _dvc(repo, "exp", "show", "--only-changed", "--drop", COMPARE_DROP, "--no-pager",
                 columns=160)
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 160 and "…" not in shown, shown
    assert all(name in shown for name in ("fid_classifier", "train.lr_d", "train.epochs"))
    _dvc(repo, "plots", "show")
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "Training losses" in html
    assert "loss_d" in html
