# The two commands (README): `make repro` runs the whole DVC pipeline, `make test` the tests.
# Both create or refresh the virtual environment at .venv/ first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1

.PHONY: venv repro test test-fast lint bench
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
