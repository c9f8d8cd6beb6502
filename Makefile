# The two commands (README): `make repro` runs the whole DVC pipeline, `make test` the tests.
# Both create or refresh the virtual environment at .venv/ first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1

.PHONY: venv repro test test-fast lint bench cluster-up cluster-down
venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	ruff check .
	python -m pytest -q

# The edit-test loop: no Ray, no MLflow server, no DVC (under a minute on 2 cores).
test-fast: $(STAMP)
	ruff check .
	python -m pytest -q -m "not slow"

lint: $(STAMP)
	ruff check .

bench: $(STAMP)
	python -m benchmarks.run_all

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
