"""Every on-disk location of the pipeline, from one root (contract: see README).

Library code never resolves a path against the working directory: a stage builds
`Layout(root)` once and hands it down, so tests and `ray job submit` entrypoints can run from
anywhere. Stores that outlive one run and are shared by every experiment (Ray checkpoints, the
feature cache; the SQLite tracking database, see `pipeline.core.tracking`) live under
`shared_root`: the root itself, except in a DVC experiment's temporary copy, where it is the
workspace the copy was made from (`workspace_root`).

DVC runs `dvc exp run --queue` and `--temp` experiments in a throw-away copy of the repository
(measured with DVC 3.67: `<workspace>/.dvc/tmp/exps/<tmpXXXX>` for the queue,
`<workspace>/.dvc/tmp/exps/standalone/<tmpXXXX>` for --temp; the copy is a git clone of its
own, so `git rev-parse --git-common-dir` answers `.git` there) and deletes it afterwards. It
sets `DVC_ROOT` of every stage command to the workspace, not the copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Relative to the root; `dvc.yaml` names the same paths.
SHARDS_DIR = Path("data/shards")
MANIFEST = Path("data/manifest.parquet")
STATS = Path("data/stats.json")
GENERATOR_WEIGHTS = Path("models/generator.pt")  # the weight average when train keeps one
RAW_GENERATOR_WEIGHTS = Path("models/generator_raw.pt")  # the last step's weights
GENERATOR_RECORD = Path("models/generator.json")
# A directory out: for unlabelled sources the classifier stage writes only spec.json saying why.
CLASSIFIER_DIR = Path("models/classifier")
CLASSIFIER_WEIGHTS_NAME = "weights.pt"
CLASSIFIER_RECORD_NAME = "spec.json"
TRAIN_LOG = Path("reports/train_log.csv")
TRAIN_QUALITY = Path("reports/train_quality.csv")
TRAIN_RUN = Path("reports/train_run.json")
TRAIN_GRIDS_DIR = Path("reports/train_grids")
EVALUATION = Path("reports/evaluation.json")
SAMPLES_GRID = Path("reports/samples.png")
INTERPOLATION_GRID = Path("reports/interpolation.png")
REALS_GRID = Path("reports/reals.png")
REGISTRY_RECORD = Path("reports/registry.json")
# `dvc metrics show` reads these: only numbers people compare across experiments.
METRICS_DIR = Path("metrics")
# Outside every DVC `outs` (DVC deletes outs before a stage reruns, Ray checkpoints must
# survive), under the shared root (a DVC experiment's temporary copy is deleted after the run).
RAY_STORAGE_DIR = Path(".ray_storage")
FEATURE_CACHE_DIR = Path(".cache/features")
# Set by DVC for every stage command (dvc/stage/run.py; the workspace for experiment copies).
DVC_ROOT_ENV = "DVC_ROOT"
# Where DVC makes the temporary copies, relative to the workspace.
DVC_TEMP_DIR = Path(".dvc") / "tmp"


def workspace_root(root: Path, env: Mapping[str, str] | None = None) -> Path:
    """The repository whose shared stores a stage running in `root` must use: DVC's workspace
    when `root` is one of its temporary experiment copies, else `root` itself."""
    env = os.environ if env is None else env
    root = Path(root).resolve()
    dvc_root = env.get(DVC_ROOT_ENV)
    if not dvc_root:
        return root
    workspace = Path(dvc_root).resolve()
    # Only a copy inside the workspace's .dvc/tmp: a DVC_ROOT left over in the environment of
    # an unrelated process must not move its database.
    if (workspace / DVC_TEMP_DIR) in root.parents and workspace.is_dir():
        return workspace
    return root


@dataclass(frozen=True)
class Layout:
    """The pipeline's files under `root` (made absolute once, at construction); shared stores
    under `shared_root` (default: `workspace_root(root)`, i.e. `root` outside a DVC copy)."""

    root: Path
    shared_root: Path | None = None

    def __post_init__(self) -> None:
        root = Path(self.root).resolve()
        object.__setattr__(self, "root", root)
        shared = workspace_root(root) if self.shared_root is None else self.shared_root
        object.__setattr__(self, "shared_root", Path(shared).resolve())

    def path(self, relative: Path | str) -> Path:
        """`relative` under the root (an absolute path is returned as is)."""
        return self.root / relative

    def shared_path(self, relative: Path | str) -> Path:
        """`relative` under the shared root (an absolute path is returned as is)."""
        assert self.shared_root is not None  # set in __post_init__
        return self.shared_root / relative

    def metrics(self, stage: str) -> Path:
        """The metrics file of `stage` (metrics/<stage>.json)."""
        return self.root / METRICS_DIR / f"{stage}.json"

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def stats(self) -> Path:
        return self.root / STATS

    @property
    def generator_weights(self) -> Path:
        return self.root / GENERATOR_WEIGHTS

    @property
    def raw_generator_weights(self) -> Path:
        return self.root / RAW_GENERATOR_WEIGHTS

    @property
    def generator_record(self) -> Path:
        return self.root / GENERATOR_RECORD

    @property
    def classifier_dir(self) -> Path:
        return self.root / CLASSIFIER_DIR

    @property
    def classifier_weights(self) -> Path:
        return self.classifier_dir / CLASSIFIER_WEIGHTS_NAME

    @property
    def classifier_record(self) -> Path:
        return self.classifier_dir / CLASSIFIER_RECORD_NAME

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def train_quality(self) -> Path:
        return self.root / TRAIN_QUALITY

    @property
    def train_run(self) -> Path:
        return self.root / TRAIN_RUN

    @property
    def train_grids_dir(self) -> Path:
        return self.root / TRAIN_GRIDS_DIR

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION

    @property
    def samples_grid(self) -> Path:
        return self.root / SAMPLES_GRID

    @property
    def interpolation_grid(self) -> Path:
        return self.root / INTERPOLATION_GRID

    @property
    def reals_grid(self) -> Path:
        return self.root / REALS_GRID

    @property
    def registry_record(self) -> Path:
        return self.root / REGISTRY_RECORD

    @property
    def ray_storage_dir(self) -> Path:
        return self.shared_path(RAY_STORAGE_DIR)

    @property
    def feature_cache_dir(self) -> Path:
        return self.shared_path(FEATURE_CACHE_DIR)

    def shards(self, configured: str = "") -> str:
        """Where shards are read from: `train.shards` (a path or fsspec URL), else data/shards."""
        if not configured:
            return str(self.shards_dir)
        if "://" in configured or Path(configured).is_absolute():
            return configured
        return str(self.root / configured)
