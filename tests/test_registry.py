"""Register, load, sample and promote: a real `mlflow server` and an embedded SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import stop_process_group, wait_for_http
from mlflow import MlflowClient
from PIL import Image
from registry_helpers import (
    DATASET_SHA,
    EXTRACTOR_SHA,
    SPEC,
    description_of,
    error_lines,
    make_workspace,
    register_in_process,
    register_stage,
    run_cli,
    tiny_generator,
)

from devtools.gloo import free_port
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import Evaluation
from pipeline.registry import promote as promotion
from pipeline.registry.promote import lower_is_better
from pipeline.registry.register import open_registry
from pipeline.registry.sampling import latent_noise, sample_to_file
from pipeline.registry.tags import evaluation_tags

pytestmark = pytest.mark.slow


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _decision(client: MlflowClient, name: str, version: str, alias: str = "champion") -> dict:
    return json.loads(client.get_model_version(name, version).tags[f"{alias}.decision"])


def test_evaluation_tags_come_from_the_record_evaluate_writes(tmp_path):
    layout = Layout(tmp_path)
    Evaluation(
        feature_extractor="classifier", feature_extractor_sha256="ab" * 32, num_samples=500,
        num_real_samples=500, floor_num_samples=500, kid_subset_size=100, generator_steps=7,
        scores={"fid_classifier": 3.25}, mode_collapse=False,
    ).save(layout)
    tags = evaluation_tags(Evaluation.load(layout))  # the same type on both sides
    assert tags["feature_extractor"] == "classifier"
    assert tags["feature_extractor_sha256"] == "ab" * 32
    assert tags["num_samples"] == "500"
    assert float(tags["metric.fid_classifier"]) == 3.25
    assert tags["mode_collapse"] == "false"
    assert lower_is_better("kid_classifier")
    assert not lower_is_better("classifier_score")


def test_register_twice_makes_one_version_that_loads_without_pickle(mlflow_server, tmp_path):
    name = "gen-register"
    workspace = make_workspace(tmp_path, mlflow_server, seed=1, fid=12.5)
    overrides = (*workspace["overrides"], f"register.model_name={name}")

    register_stage(tmp_path, overrides)
    first = json.loads((tmp_path / "reports" / "registry.json").read_text())
    client = _client(mlflow_server)
    # A tag per parameter, as releases before the lean registry set: dropped on re-register.
    client.set_model_version_tag(name, "1", "param.train.lr_g", "0.0002")
    register_stage(tmp_path, overrides)
    second = json.loads((tmp_path / "reports" / "registry.json").read_text())

    assert (
        first
        == second
        == {"name": name, "version": "1", "uri": f"models:/{name}/1", "alias": "candidate",
            "alias_withheld": None}
    )
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    version = client.get_model_version_by_alias(name, "candidate")
    # Linked to the training run, tagged with what promote and lineage need, nothing more:
    # the parameters stay on the run.
    assert version.run_id == workspace["run_id"]
    tags = version.tags
    assert float(tags["metric.fid_classifier"]) == 12.5
    assert tags["feature_extractor"] == "classifier"
    assert tags["feature_extractor_sha256"] == EXTRACTOR_SHA
    assert tags["num_samples"] == "100" and tags["num_real_samples"] == "100"
    assert tags["dataset_sha256"] == DATASET_SHA
    assert tags["mlflow_run_id"] == workspace["run_id"]
    assert tags["ray_run_name"] == "ray-seed-1"
    assert not [key for key in tags if key.startswith("param.")]
    assert len(tags) <= 20, sorted(tags)
    # The version says what it is (the run's description), and so does the model.
    assert version.description.startswith(description_of(1))
    assert "champion" in client.get_registered_model(name).description

    # The stored model holds code, JSON and a state_dict: nothing pickled to run at load.
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@candidate"))
    stored = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert not any(p.endswith((".pkl", ".pickle", ".cloudpickle")) for p in stored), stored
    assert {"MLmodel", "artifacts/generator.pt", "artifacts/spec.json"} <= stored, stored
    assert any(p.endswith("generator_pyfunc.py") for p in stored), stored

    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    z = latent_noise(5, 8, seed=3)
    images = model.predict({"z": z})
    assert images.shape == (5, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    with torch.no_grad():
        expected = workspace["generator"](torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-6)
    inputs = model.metadata.get_input_schema().inputs
    assert inputs[0].name == "z" and inputs[0].shape == (-1, 8)


def test_a_collapsed_or_non_finite_evaluation_is_registered_but_never_the_candidate(
        mlflow_server, tmp_path):
    name = "gen-withheld"
    client = _client(mlflow_server)

    def register(seed: int, fid: float, classes_hit: int) -> tuple[dict, str]:
        root = tmp_path / f"seed{seed}"
        workspace = make_workspace(root, mlflow_server, seed=seed, fid=fid,
                                   classes_hit=classes_hit)
        stage = register_stage(root, (*workspace["overrides"], f"register.model_name={name}"))
        return json.loads((root / "reports" / "registry.json").read_text()), stage.stdout

    good, _ = register(1, 12.5, 10)
    assert good["alias"] == "candidate" and good.get("alias_withheld") is None
    collapsed, said = register(2, 594.95, 1)
    not_finite, _ = register(3, float("nan"), 10)

    # Both are versions (lineage), neither moved the alias off the good one.
    assert [collapsed["version"], not_finite["version"]] == ["2", "3"]
    assert client.get_model_version_by_alias(name, "candidate").version == "1"
    assert collapsed["alias_withheld"] == "mode collapse (1/10 classes)"
    assert not_finite["alias_withheld"] == "non-finite fid_classifier"
    assert "not moved: mode collapse (1/10 classes)" in said
    tags = client.get_model_version(name, "2").tags
    assert tags["alias_withheld"] == "mode collapse (1/10 classes)"
    assert "alias_withheld" not in client.get_model_version(name, "1").tags


def test_sample_writes_grid_and_array_from_alias(mlflow_server, tmp_path):
    workspace = make_workspace(
        tmp_path, mlflow_server, seed=2, fid=10.0, overrides=("register.model_name=gen-sample",)
    )
    register_in_process(tmp_path, workspace, mlflow_server)

    model_uri = f"models:/{workspace['config'].register.model_name}@candidate"
    sample = ["-m", "pipeline", "sample", "--tracking-uri", mlflow_server, "--model", model_uri]
    run_cli([*sample, "--n", "10", "--seed", "7", "--out", "grid.png"], tmp_path)
    # The same images as an array.
    sample_to_file(model_uri, 10, 7, tmp_path / "z.npy", "npy")

    with Image.open(tmp_path / "grid.png") as grid:
        # 10 images of 16 px, 4 per row (ceil(sqrt(10))), 3 rows, 2 px padding.
        assert grid.size == (4 * 18 + 2, 3 * 18 + 2) and grid.mode == "L"
    array = np.load(tmp_path / "z.npy", allow_pickle=False)
    with torch.no_grad():
        expected = workspace["generator"](torch.from_numpy(latent_noise(10, 8, seed=7))).numpy()
    np.testing.assert_allclose(array, expected, atol=1e-6)


def test_promote_moves_champion_only_for_better_and_records_decisions(mlflow_server, tmp_path):
    name = "gen-promote"
    uri = mlflow_server
    client = _client(uri)

    def register(seed: int, fid: float, **kwargs) -> str:
        root = tmp_path / f"ws{seed}"
        workspace = make_workspace(
            root, uri, seed=seed, fid=fid, overrides=(f"register.model_name={name}",), **kwargs
        )
        return register_in_process(root, workspace, uri).version

    def promote(*args: str, check: bool = True):
        cli = ["-m", "pipeline", "promote", "--tracking-uri", uri, "--name", name, *args]
        return run_cli(cli, tmp_path, check=check)

    v1 = register(11, fid=10.0)
    promote()  # nobody holds champion: the candidate takes it
    assert client.get_model_version_by_alias(name, "champion").version == v1
    summary = client.get_model_version(name, v1).tags["champion.summary"]
    assert summary.startswith(f"version {v1} took 'champion': ")
    assert _decision(client, name, v1)["previous_version"] is None

    v2 = register(12, fid=5.0)
    promote()
    assert client.get_model_version_by_alias(name, "champion").version == v2
    decision = _decision(client, name, v2)
    assert decision["promoted"] and decision["previous_version"] == v1
    assert (decision["value"], decision["previous_value"]) == (5.0, 10.0)
    assert decision["metric"] == "fid_classifier" and decision["time"]
    last = json.loads(client.get_registered_model(name).tags["champion.last_decision"])
    assert last["version"] == v2

    v3 = register(13, fid=20.0)
    refused = promote(check=False)
    assert refused.returncode == 1
    [line] = error_lines(refused.stderr)
    assert "does not beat champion version 2" in line and "fid_classifier=20" in line, line
    assert client.get_model_version_by_alias(name, "champion").version == v2
    assert _decision(client, name, v3)["promoted"] is False

    promote("--version", v3, "--force")
    assert client.get_model_version_by_alias(name, "champion").version == v3
    assert _decision(client, name, v3)["forced"] is True

    # Rollback to an older, better version: allowed; to an older, worse one: only with --force.
    # (Through the library the CLI calls: each new interpreter costs seconds of CPU.)
    promotion.promote(client, name, version=v2)
    assert client.get_model_version_by_alias(name, "champion").version == v2
    with pytest.raises(UserError, match="does not beat champion version 2"):
        promotion.promote(client, name, version=v1)
    promotion.promote(client, name, version=v1, force=True)
    assert client.get_model_version_by_alias(name, "champion").version == v1

    # Higher-is-better metrics compare the other way round (classifier_score = 9 - fid/10).
    decision = promotion.promote(client, name, version=v2, metric="classifier_score")
    assert decision.promoted and (decision.value, decision.previous_value) == (8.5, 8.0)
    assert client.get_model_version_by_alias(name, "champion").version == v2

    # A version scored with another extractor is not comparable, whatever its number.
    v4 = register(14, fid=1.0, extractor_sha="f" * 64)
    with pytest.raises(UserError, match=r"different feature extractor .* not comparable"):
        promotion.promote(client, name, version=v4)
    assert client.get_model_version_by_alias(name, "champion").version == v2
    assert _decision(client, name, v4)["promoted"] is False


def test_unreachable_server_is_one_line_error_before_work(mlflow_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    workspace = make_workspace(tmp_path, mlflow_server, seed=4, fid=3.0)
    commands = [
        ["-m", "pipeline", "promote", "--tracking-uri", dead, "--name", "x"],
        [
            "-m",
            "pipeline",
            "sample",
            "--tracking-uri",
            dead,
            "--model",
            "models:/x@c",
            "--out",
            "g.png",
        ],
        ["-m", "pipeline", "compare", "--tracking-uri", dead, "--out", "c.png"],
    ]
    for args in commands:
        result = run_cli(args, tmp_path, check=False)
        assert result.returncode == 1, args
        [line] = error_lines(result.stderr)
        assert dead in line and "not reachable" in line
    stage = register_stage(
        tmp_path, (*workspace["overrides"], f"mlflow.tracking_uri={dead}"), check=False
    )
    assert stage.returncode == 1
    assert "not reachable" in error_lines(stage.stderr)[0]
    assert not (tmp_path / "reports" / "registry.json").exists()
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "c.png").exists()


def test_register_and_sample_with_embedded_sqlite(tmp_path, monkeypatch):
    # The store's default artifact root is ./mlruns of whoever creates the experiment.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workspace = make_workspace(tmp_path, uri, seed=5, fid=7.0)
    register_stage(tmp_path, (*workspace["overrides"], "register.model_name=gen-sqlite"))
    record = json.loads((tmp_path / "reports" / "registry.json").read_text())
    assert record == {
        "name": "gen-sqlite",
        "version": "1",
        "uri": "models:/gen-sqlite/1",
        "alias": "candidate",
        "alias_withheld": None,
    }
    open_registry(uri)
    sample_to_file("models:/gen-sqlite@candidate", 4, 0, tmp_path / "s.npy", "npy")
    array = np.load(tmp_path / "s.npy", allow_pickle=False)
    with torch.no_grad():
        expected = tiny_generator(5)(torch.from_numpy(latent_noise(4, 8, seed=0))).numpy()
    np.testing.assert_allclose(array, expected, atol=1e-6)


def test_the_models_code_shipped_with_a_version_never_hides_the_library(tmp_path):
    """Loading a registered model puts its code package first on sys.path (MLflow's
    code_paths); the rest of the library must still import there, in a fresh process as a
    spawned DDP rank would start (a partial `pipeline.models` copy hid the classifier)."""
    import os
    import subprocess
    import sys

    from pipeline.registry.package import _code_package

    code = _code_package(tmp_path / "code").parent
    script = ("import pipeline.models.dcgan, pipeline.train.loop, pipeline.metrics.probe; "
              "print(pipeline.models.__file__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(code)}, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith(str(code))  # the shipped copy did shadow it


def _post_json(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_models_serve_answers_with_the_images_pipeline_sample_draws(mlflow_server,
                                                                            tmp_path):
    """README, "Serving the champion": `mlflow models serve` on a registered version, z posted
    as {"inputs": ...} (or {"instances": ...}); the same z gives the same images as `sample`;
    a wrong shape is a 4xx that names the expected one."""
    name = "gen-serve"
    workspace = make_workspace(tmp_path, mlflow_server, seed=4, fid=9.0,
                               overrides=(f"register.model_name={name}",))
    register_in_process(tmp_path, workspace, mlflow_server)
    client = _client(mlflow_server)
    client.set_registered_model_alias(name, "champion", "1")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout_s=180, server=server,
                      log=tmp_path / "serve.log")
        z = latent_noise(4, SPEC.nz, seed=3)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = _post_json(url, {"inputs": z.tolist()})
        assert status == 200, body
        images = np.asarray(body["predictions"], dtype=np.float32)
        assert images.shape == (4, SPEC.channels, SPEC.image_size, SPEC.image_size)
        assert images.min() >= -1 and images.max() <= 1
        sample_to_file(f"models:/{name}@champion", 4, 3, tmp_path / "s.npy", "npy")
        np.testing.assert_allclose(images, np.load(tmp_path / "s.npy"), atol=1e-5)
        status, body = _post_json(url, {"instances": z.tolist()})
        assert status == 200 and np.asarray(body["predictions"]).shape == images.shape

        status, body = _post_json(url, {"inputs": [[0.0, 0.0]]})
        assert 400 <= status < 500
        assert f"(-1, {SPEC.nz})" in body.get("message", ""), body
    finally:
        stop_process_group(server)
