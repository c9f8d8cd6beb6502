"""Params validation as a user meets it: `python stages/prepare.py -S ...` exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, stage_env

from pipeline.core.config import Config, load_config, to_flat_dict

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repo copy, so that a validation bug could not write into the real data/."""
    return copy_repo(tmp_path_factory.mktemp("config") / "repo")


def run_prepare(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "stages/prepare.py", *args],
        cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("data.image_size=48", "data.image_size", "power of two"),
        ("data.channels=2", "data.channels", "one of 1, 3"),
        ("data.val_fraction=1.5", "data.val_fraction", "[0.0, 1.0)"),
        ("data.image_size=big", "data.image_size", "integer"),
        ("data.on_bad_image=ignore", "data.on_bad_image", "'skip', 'error'"),
        ("data.colour=1", "data.colour", "unknown key"),
        ("trian.epochs=1", "trian", "unknown key"),
    ],
)
def test_bad_override_is_one_line_exit_2(repo, override, key, allowed):
    result = run_prepare(repo, "-S", override)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and allowed in lines[0], lines[0]
    assert not (repo / "data").exists()  # refused before any work


def test_bad_key_in_params_file_is_reported(repo, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text().replace("seed: 0", "seed: -1", 1))
    result = run_prepare(repo, "--params", str(params))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data.seed: must be >= 0, got -1"
    ], result.stderr


def test_set_params_keeps_the_file_as_people_wrote_it(repo, tmp_path):
    """import-run sets keys in params.yaml: comments, order and quoting stay, and the values
    read back with their types (a float like 1e-05 too, which PyYAML reads as text)."""
    from pipeline.core.config import from_logged_text, load_config, set_params

    params = tmp_path / "params.yaml"
    original = (repo / "params.yaml").read_text()
    params.write_text(original)
    logged = {"train.lr_g": "1e-05", "train.epochs": "3", "train.use_gpu": "True",
              "mlflow.tracking_uri": "http://127.0.0.1:5000"}
    cfg = set_params(params, {key: from_logged_text(key, text) for key, text in logged.items()})
    assert (cfg.train.lr_g, cfg.train.epochs, cfg.train.use_gpu) == (1e-05, 3, True)
    assert load_config(params) == cfg
    pairs = zip(original.splitlines(), params.read_text().splitlines(), strict=True)
    changed = [(old, new) for old, new in pairs if old != new]
    assert len(changed) == 4  # those four lines, nothing else: comments and quotes stay
    assert all("#" in new for old, new in changed if "#" in old)


@pytest.mark.parametrize(("key", "text"), [("train.epochs", "2.5"), ("train.use_gpu", "yes"),
                                           ("train.epoch", "1")])
def test_logged_text_of_the_wrong_type_or_key_is_refused(key, text):
    from pipeline.core.config import from_logged_text
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        from_logged_text(key, text)


def test_params_yaml_spells_out_exactly_the_built_in_defaults():
    """One source of defaults: the repository's params.yaml names every key, with the value
    `Config()` has, so tests, the CLI and `dvc repro` train the same model."""
    tree = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    written = {f"{section}.{key}" for section, values in tree.items() for key in values}
    defaults = to_flat_dict(Config())
    assert written == set(defaults)
    from_file = to_flat_dict(load_config(REPO_ROOT / "params.yaml"))
    assert {key: value for key, value in from_file.items() if defaults[key] != value} == {}
