"""`python -m pipeline compare`: differing params, key metrics, grids from the same noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from registry_helpers import make_workspace, register_in_process, run_cli

from pipeline.core.errors import UserError
from pipeline.core.tracking import set_tags
from pipeline.data.grids import display_copy, make_grid
from pipeline.registry.compare import CAPTION_HEIGHT_PX, GAP_PX, RunSelection, compare_runs
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

    # Each panel is that run's generator applied to the same noise (3 x 3 grid of 16 px,
    # enlarged three times to be read).
    noise = torch.from_numpy(latent_noise(9, 8, seed=3))
    with Image.open(tmp_path / "compare.png") as image:
        pixels = np.asarray(image.convert("L"))
    panel_px = 3 * (3 * 18 + 2)
    assert pixels.shape == (CAPTION_HEIGHT_PX + panel_px, 2 * panel_px + GAP_PX)
    for index, seed in enumerate((21, 22)):
        with torch.no_grad():
            grid = make_grid(workspaces[seed]["generator"](noise), 3)
            expected = np.asarray(display_copy(grid))
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
    compare_runs(client, experiment, RunSelection(run_ids=order), tmp_path / "again.png",
                 tmp_path / "compare.md")
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith("| run_id") and "param.train.lr_g" in markdown
    assert markdown.index(order[0]) < markdown.index(order[1])


def test_compare_selects_the_runs_of_a_sweep_by_dvc_experiment_name_or_tag(mlflow_server,
                                                                          tmp_path):
    # Three runs as a queued DVC sweep leaves them (`dvc.exp_name`, `dvc.baseline_rev` are
    # what the train stage tags; tests/test_end_to_end.py runs the real DVC queue).
    experiment, runs = "compare-sweep", {}
    for seed, exp_name, baseline in ((31, "exp-a", "rev1"), (32, "exp-b", "rev1"),
                                     (33, "exp-c", "rev2")):
        root = tmp_path / exp_name
        workspace = make_workspace(root, mlflow_server, seed=seed, fid=float(seed),
                                   experiment=experiment,
                                   overrides=("register.model_name=gen-sweep",))
        register_in_process(root, workspace, mlflow_server)
        set_tags(mlflow_server, workspace["run_id"],
                 {"dvc.exp_name": exp_name, "dvc.baseline_rev": baseline})
        runs[exp_name] = workspace["run_id"]

    base = ["-m", "pipeline", "compare", "--tracking-uri", mlflow_server, "--experiment",
            experiment, "--samples", "4"]
    run_cli([*base, "--dvc-exp", "exp-b", "exp-a", "--out", "named.png", "--table", "n.csv"],
            tmp_path)
    named = pd.read_csv(tmp_path / "n.csv")
    assert list(named["run_id"]) == [runs["exp-b"], runs["exp-a"]]
    assert list(named["dvc_exp"]) == ["exp-b", "exp-a"]
    with Image.open(tmp_path / "named.png") as image:
        assert image.width == 2 * (3 * (2 * 18 + 2)) + GAP_PX  # two panels of 2 x 2 images

    run_cli([*base, "--tag", "dvc.baseline_rev=rev1", "--out", "tagged.png", "--table",
             "t.md"], tmp_path)
    tagged = (tmp_path / "t.md").read_text()
    assert runs["exp-a"] in tagged and runs["exp-b"] in tagged and runs["exp-c"] not in tagged

    missing = run_cli([*base, "--dvc-exp", "exp-z", "--out", "none.png"], tmp_path, check=False)
    assert missing.returncode == 1
    assert "tagged dvc.exp_name=exp-z" in missing.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "none.png").exists()


def test_compare_refuses_a_bad_table_suffix_and_a_missing_experiment(mlflow_server, tmp_path):
    client = open_registry(mlflow_server)
    with pytest.raises(UserError, match=r"--table must end with \.csv or \.md"):
        compare_runs(client, "any", RunSelection(), tmp_path / "c.png", tmp_path / "t.xlsx")
    with pytest.raises(UserError, match="no MLflow experiment named 'no-such-experiment'"):
        compare_runs(client, "no-such-experiment", RunSelection(), tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
