"""`python -m pipeline compare`: differing params, key metrics, grids from the same noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from registry_helpers import make_workspace, register_in_process, run_cli

from pipeline.core.errors import UserError
from pipeline.data.grids import make_grid
from pipeline.registry.compare import CAPTION_HEIGHT_PX, GAP_PX, compare_runs
from pipeline.registry.register import open_registry
from pipeline.registry.sampling import latent_noise

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

    # The same comparison as a markdown table, for explicit run ids, in their order.
    order = [workspaces[22]["run_id"], workspaces[21]["run_id"]]
    client = open_registry(mlflow_server)
    compare_runs(client, experiment, order, tmp_path / "again.png", tmp_path / "compare.md")
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith("| run_id") and "param.train.lr_g" in markdown
    assert markdown.index(order[0]) < markdown.index(order[1])


def test_compare_refuses_a_bad_table_suffix_and_a_missing_experiment(mlflow_server, tmp_path):
    client = open_registry(mlflow_server)
    with pytest.raises(UserError, match=r"--table must end with \.csv or \.md"):
        compare_runs(client, "any", [], tmp_path / "c.png", tmp_path / "t.xlsx")
    with pytest.raises(UserError, match="no MLflow experiment named 'no-such-experiment'"):
        compare_runs(client, "no-such-experiment", [], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
