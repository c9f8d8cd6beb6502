"""Default on-disk locations (contract: see README). Relative to the repository root."""

from pathlib import Path

DATA_DIR = Path("data")
SHARDS_DIR = DATA_DIR / "shards"
MANIFEST = DATA_DIR / "manifest.parquet"
STATS = DATA_DIR / "stats.json"

MODELS_DIR = Path("models")
GENERATOR_WEIGHTS = MODELS_DIR / "generator.pt"
GENERATOR_SPEC = MODELS_DIR / "generator.json"
# A directory out: for unlabelled sources featurize writes only spec.json saying why.
CLASSIFIER_DIR = MODELS_DIR / "classifier"
CLASSIFIER_WEIGHTS = CLASSIFIER_DIR / "weights.pt"
CLASSIFIER_SPEC = CLASSIFIER_DIR / "spec.json"

REPORTS_DIR = Path("reports")
TRAIN_LOG = REPORTS_DIR / "train_log.csv"
TRAIN_RUN = REPORTS_DIR / "train_run.json"
TRAIN_GRIDS_DIR = REPORTS_DIR / "train_grids"
FEATURIZE_METRICS = REPORTS_DIR / "featurize.json"
EVAL_METRICS = REPORTS_DIR / "metrics.json"
SAMPLES_GRID = REPORTS_DIR / "samples.png"
INTERPOLATION_GRID = REPORTS_DIR / "interpolation.png"
REALS_GRID = REPORTS_DIR / "reals.png"
REGISTRY_RECORD = REPORTS_DIR / "registry.json"

# Outside every DVC `outs`: DVC deletes outs before a stage reruns, Ray checkpoints must survive.
RAY_STORAGE_DIR = Path(".ray_storage")
FEATURE_CACHE_DIR = Path(".cache/features")


def shard_paths(split: str, shards_dir: Path = SHARDS_DIR) -> list[Path]:
    """The sorted shard files of one split (`train` or `val`)."""
    return sorted(shards_dir.glob(f"{split}-*.tar"))
