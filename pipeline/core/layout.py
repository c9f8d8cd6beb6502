"""Every on-disk location of the pipeline, from one root (contract: see README).

Library code never resolves a path against the working directory: a stage builds
`Layout(root)` once and hands it down, so tests and `ray job submit` entrypoints can run from
anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Relative to the root; `dvc.yaml` names the same paths.
SHARDS_DIR = Path("data/shards")
MANIFEST = Path("data/manifest.parquet")
STATS = Path("data/stats.json")
GENERATOR_WEIGHTS = Path("models/generator.pt")
GENERATOR_RECORD = Path("models/generator.json")
# A directory out: for unlabelled sources the classifier stage writes only spec.json saying why.
CLASSIFIER_DIR = Path("models/classifier")
CLASSIFIER_WEIGHTS_NAME = "weights.pt"
CLASSIFIER_RECORD_NAME = "spec.json"
TRAIN_LOG = Path("reports/train_log.csv")
TRAIN_RUN = Path("reports/train_run.json")
TRAIN_GRIDS_DIR = Path("reports/train_grids")
EVALUATION = Path("reports/evaluation.json")
SAMPLES_GRID = Path("reports/samples.png")
INTERPOLATION_GRID = Path("reports/interpolation.png")
REALS_GRID = Path("reports/reals.png")
REGISTRY_RECORD = Path("reports/registry.json")
# `dvc metrics show` reads these: only numbers people compare across experiments.
METRICS_DIR = Path("metrics")
# Outside every DVC `outs`: DVC deletes outs before a stage reruns, Ray checkpoints must survive.
RAY_STORAGE_DIR = Path(".ray_storage")
FEATURE_CACHE_DIR = Path(".cache/features")


@dataclass(frozen=True)
class Layout:
    """The pipeline's files under `root` (made absolute once, at construction)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def path(self, relative: Path | str) -> Path:
        """`relative` under the root (an absolute path is returned as is)."""
        return self.root / relative

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
        return self.root / RAY_STORAGE_DIR

    @property
    def feature_cache_dir(self) -> Path:
        return self.root / FEATURE_CACHE_DIR

    def shards(self, configured: str = "") -> str:
        """Where shards are read from: `train.shards` (a path or fsspec URL), else data/shards."""
        if not configured:
            return str(self.shards_dir)
        if "://" in configured or Path(configured).is_absolute():
            return configured
        return str(self.root / configured)
