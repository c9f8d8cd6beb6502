"""Shared fixtures: one real local Ray cluster and one real MLflow server per test session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# No network here: keep every client from phoning home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 120.0) -> None:
    """Poll `url` until it answers 200 or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test (4 logical CPUs on 2 cores)."""
    import ray

    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=4, dashboard_host="127.0.0.1", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a temporary backend; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health")
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def copy_repo(target: Path) -> Path:
    """Copy the repository's source (no venv, data or outputs) to `target` for stage runs."""
    ignore = shutil.ignore_patterns(
        ".venv", "data", "models", "reports", "mlflow.db", "mlruns", "mlartifacts",
        ".ray_storage", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl",
    )
    shutil.copytree(REPO_ROOT, target, ignore=ignore, dirs_exist_ok=True)
    return target


# --- data (issue 2) -----------------------------------------------------------------------------


def stage_env(repo: Path) -> dict[str, str]:
    """Environment to run stages or dvc in a repo copy: the copy's own `pipeline` package first
    (the venv's editable install points at the original checkout), the venv's tools on PATH."""
    return {
        **os.environ,
        "PYTHONPATH": str(repo),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory):
    """A repo copy where `python stages/prepare.py` ran once on mnist5k with the repo's
    params.yaml (4,500 train + 500 val). Yields the copy's root; shards in data/shards.
    Treat it as read-only: other tests share it."""
    repo = copy_repo(tmp_path_factory.mktemp("mnist_shards") / "repo")
    result = subprocess.run(
        [sys.executable, "stages/prepare.py"],
        cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"prepare on mnist5k failed:\n{result.stderr[-3000:]}")
    yield repo


# --- evaluation (issue 4) -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def featurized_repo(mnist_shards, tmp_path_factory):
    """A repo copy holding mnist_shards' data where `python stages/featurize.py` ran once (the
    trained domain classifier in models/classifier). Read-only for tests: copy what you change."""
    repo = copy_repo(tmp_path_factory.mktemp("featurized") / "repo")
    shutil.copytree(mnist_shards / "data", repo / "data")
    # One torch thread: on 2 shared cores, two threads per process stall each other.
    result = subprocess.run(
        [sys.executable, "stages/featurize.py"],
        cwd=repo, env={**stage_env(repo), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"featurize on mnist5k failed:\n{result.stderr[-3000:]}")
    yield repo
