# The two commands (README): `make repro` runs the whole DVC pipeline, `make test` the tests.
# Both create or refresh the virtual environment at .venv/ first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1

.PHONY: venv repro test test-fast lint bench gpu-wheels cluster-up cluster-down
venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

# pytest keeps the test modules it rewrote (for its assert messages) as bytecode; under
# PYTHONDONTWRITEBYTECODE (set on some machines, CI's among them) every pytest process would
# rewrite them again: ~2 s of CPU each (measured on `--collect-only`).
PYTEST := PYTHONDONTWRITEBYTECODE= python -m pytest

test: $(STAMP)
	ruff check .
	$(PYTEST) -q

# The edit-test loop: no Ray, no MLflow server, no DVC; on up to 4 cores (pytest-xdist).
test-fast: $(STAMP)
	ruff check .
	$(PYTEST) -q -m "not slow" -n auto --maxprocesses 4

lint: $(STAMP)
	ruff check .

bench: $(STAMP)
	python -m benchmarks.run_all

# The wheels `bash benchmarks/gpu.sh [--tests]` needs beyond torch and numpy (a GPU machine with
# only those), at this repository's pins, for the GPU machine's Python: into .whl/, which
# gpu.sh installs with `pip --target` (tests/test_architecture.py checks that the GPU test and
# benchmark import with no more than these).
GPU_PYTHON ?= 3.12
GPU_WHEELS := pillow|pyyaml|fsspec|tqdm|webdataset|braceexpand|pytest|pytest-timeout|pluggy|iniconfig|packaging|pygments
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(grep -iE '^($(GPU_WHEELS))==' constraints.txt)
	ls .whl

# A Ray cluster on this host (README, "Running on a Ray cluster"): a head and NODES-1 workers,
# token authentication; its token, cluster.env and logs in .ray_cluster/. cluster-down stops
# exactly those nodes (never `ray stop`: it would kill every Ray of this user on the host).
# The venv is made when no `ray` is on PATH (.venv/bin comes first), never refreshed here.
NODES ?= 1
CPUS_PER_NODE ?= 0
CLUSTER_HOST ?= 127.0.0.1
CLUSTER_PORT ?= 6379
CLUSTER_DASHBOARD_PORT ?= 8265
cluster-up:
	@command -v ray >/dev/null || $(MAKE) venv
	python deploy/cluster.py up --nodes $(NODES) --cpus-per-node $(CPUS_PER_NODE) \
		--host $(CLUSTER_HOST) --port $(CLUSTER_PORT) --dashboard-port $(CLUSTER_DASHBOARD_PORT)

cluster-down:
	python3 deploy/cluster.py down
