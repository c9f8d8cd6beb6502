"""`python -m pipeline compare`: differing params, key metrics, grids from the same noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from registry_helpers import error_lines, make_workspace, register_in_process, run_cli

from pipeline.compare import CAPTION_HEIGHT_PX, GAP_PX
from pipeline.grids import make_grid
from pipeline.sampling import latent_noise

pytestmark = pytest.mark.slow


def test_compare_two_runs_writes_table_and_side_by_side_grids(mlflow_server, tmp_path):
    experiment = "compare-tests"
    workspaces = {}
    for seed, lr_g, fid in ((21, 0.0002, 8.0), (22, 0.0005, 4.0)):
        root = tmp_path / f"run{seed}"
        workspaces[seed] = make_workspace(
            root,
            mlflow_server,
            seed=seed,
            fid=fid,
            experiment=experiment,
            overrides=(f"train.lr_g={lr_g}", "register.model_name=gen-compare"),
        )
        register_in_process(root, workspaces[seed], mlflow_server)

    result = run_cli(
        [
            "-m",
            "pipeline",
            "compare",
            "--tracking-uri",
            mlflow_server,
            "--experiment",
            experiment,
            "--out",
            "compare.png",
            "--table",
            "compare.csv",
            "--samples",
            "9",
            "--seed",
            "3",
        ],
        tmp_path,
    )
    assert "param.train.lr_g" in result.stdout

    table = pd.read_csv(tmp_path / "compare.csv")
    assert list(table["run_id"]) == [workspaces[21]["run_id"], workspaces[22]["run_id"]]
    # Only what differs: lr_g does, the epochs (same in both) do not.
    assert list(table["param.train.lr_g"]) == [0.0002, 0.0005]
    assert "param.train.epochs" not in table.columns
    assert list(table["fid_classifier"]) == [8.0, 4.0]

    # Each panel is that run's generator applied to the same noise (3 x 3 grid of 16 px).
    noise = torch.from_numpy(latent_noise(9, 8, seed=3))
    with Image.open(tmp_path / "compare.png") as image:
        pixels = np.asarray(image.convert("L"))
    panel_px = 3 * 18 + 2
    assert pixels.shape == (CAPTION_HEIGHT_PX + panel_px, 2 * panel_px + GAP_PX)
    for index, seed in enumerate((21, 22)):
        with torch.no_grad():
            expected = np.asarray(make_grid(workspaces[seed]["generator"](noise), 3))
        left = index * (panel_px + GAP_PX)
        panel = pixels[CAPTION_HEIGHT_PX:, left : left + panel_px]
        # Decoded images match to one grey level (predict and eager forward may round apart).
        assert np.abs(panel.astype(int) - expected.astype(int)).max() <= 1
    first, second = (
        pixels[CAPTION_HEIGHT_PX:, i * (panel_px + GAP_PX) :][:, :panel_px] for i in (0, 1)
    )
    assert not np.array_equal(first, second)

    # The same comparison as a markdown table, for explicit run ids.
    run_cli(
        [
            "-m",
            "pipeline",
            "compare",
            "--tracking-uri",
            mlflow_server,
            "--experiment",
            experiment,
            "--runs",
            workspaces[22]["run_id"],
            workspaces[21]["run_id"],
            "--out",
            "again.png",
            "--table",
            "compare.md",
        ],
        tmp_path,
    )
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith("| run_id") and "param.train.lr_g" in markdown
    assert markdown.index(workspaces[22]["run_id"]) < markdown.index(workspaces[21]["run_id"])


def test_compare_refuses_a_bad_table_suffix_and_a_missing_experiment(mlflow_server, tmp_path):
    base = ["-m", "pipeline", "compare", "--tracking-uri", mlflow_server, "--out", "c.png"]
    bad_suffix = run_cli([*base, "--experiment", "x", "--table", "t.xlsx"], tmp_path, check=False)
    assert bad_suffix.returncode == 1 and ".csv or .md" in error_lines(bad_suffix.stderr)[0]
    missing = run_cli([*base, "--experiment", "no-such-experiment"], tmp_path, check=False)
    assert missing.returncode == 1
    assert "no MLflow experiment named 'no-such-experiment'" in error_lines(missing.stderr)[0]
    assert not (tmp_path / "c.png").exists()
