"""The typed JSON records that stages hand each other, one type per file.

Each record knows its file (under a `Layout`) and the stage that writes it: `load` turns a
missing or stale file into one `UserError` line naming the stage to rerun, `save` writes it.
Files pinned by a hash (generator and classifier weights) are verified in one place,
`verify_sha256`. Records hold plain JSON values; the layers above turn them into models.

What people compare lives in `metrics()` (metrics/<stage>.json, `dvc metrics show`);
ids, hashes, paths and per-class counts stay in the record itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from pipeline.core import layout as files_layout
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file, write_json
from pipeline.core.layout import Layout


def verify_sha256(path: Path, expected: str | None, record_path: Path, stage: str) -> str:
    """The SHA-256 of `path`; UserError when the file is missing or differs from `expected`
    (recorded in `record_path` by `stage`)."""
    if not path.exists():
        raise UserError(f"{path} not found: run `dvc repro {stage}` first")
    digest = sha256_file(path)
    if expected and digest != expected:
        raise UserError(
            f"{path} does not match the SHA-256 recorded in {record_path}: "
            f"rerun `dvc repro {stage}`"
        )
    return digest


def _from_known_keys(cls: type[Any], values: Any) -> Any:
    """`cls` built from the keys of the JSON object `values` that are its fields (unknown
    keys ignored: a newer writer does not break an older reader); TypeError otherwise."""
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class Record:
    """Base of every stage record: a frozen dataclass stored as one JSON object."""

    RELATIVE_PATH: ClassVar[Path]
    STAGE: ClassVar[str]  # the DVC stage that writes it
    SORT_KEYS: ClassVar[bool] = False

    @classmethod
    def path(cls, layout: Layout) -> Path:
        """Where this record lives under `layout`."""
        return layout.path(cls.RELATIVE_PATH)

    @classmethod
    def exists(cls, layout: Layout) -> bool:
        """Whether the stage has written it."""
        return cls.path(layout).exists()

    @classmethod
    def load(cls, layout: Layout) -> Self:
        """Read and check the record; UserError naming the stage to run when missing or stale."""
        path = cls.path(layout)
        if not path.exists():
            raise UserError(f"{path} not found: run `dvc repro {cls.STAGE}` first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise UserError(
                f"{path} is stale or damaged ({err}): rerun `dvc repro {cls.STAGE}`"
            ) from err

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from parsed JSON; TypeError on a missing required key (unknown keys: ignored,
        so that a newer writer does not break an older reader)."""
        return _from_known_keys(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to disk."""
        return dataclasses.asdict(self)

    def save(self, layout: Layout) -> Path:
        """Write the record (and its metrics file, when it has one); returns the record path."""
        path = write_json(self.path(layout), self.to_dict(), sort_keys=self.SORT_KEYS)
        people = self.metrics()
        if people is not None:
            write_json(layout.metrics(self.STAGE), people)
        return path

    def metrics(self) -> dict[str, Any] | None:
        """What `dvc metrics show` prints for this stage; None: no metrics file."""
        return None


@dataclass(frozen=True)
class DatasetStats(Record):
    """data/stats.json, written by `prepare`: counts, skipped files, shard hashes."""

    RELATIVE_PATH: ClassVar[Path] = files_layout.STATS
    STAGE: ClassVar[str] = "prepare"
    SORT_KEYS: ClassVar[bool] = True

    source: str
    source_kind: str
    images_found: int
    samples: int
    splits: dict[str, dict[str, Any]]  # split -> {samples, shards, classes: {name: count}}
    shards: int
    labelled: bool
    num_classes: int | None
    class_names: list[str]
    image_size: int
    channels: int
    skipped_total: int
    skipped: dict[str, dict[str, Any]]  # reason -> {count, paths}
    ignored_files: dict[str, Any]
    pixel_mean: list[float]
    pixel_std: list[float]
    shard_sha256: dict[str, str]
    dataset_sha256: str
    # Every skipped image (index, reason, path, detail), relative to the root: `skipped` shows
    # at most 100 paths per reason.
    skipped_list: str = ""

    def split_samples(self, split: str) -> int:
        """Samples in `split` (0 when the split is empty)."""
        return int(self.splits.get(split, {}).get("samples", 0))

    def split_shape(self, split: str) -> tuple[int, int, int, int]:
        """(N, C, H, W) of `split` decoded: what a cache of it holds."""
        return (self.split_samples(split), self.channels, self.image_size, self.image_size)

    def split_hash(self, split: str) -> str:
        """A hash of one split's shards, else of the whole dataset."""
        own = {k: v for k, v in self.shard_sha256.items() if k.startswith(split)}
        if not own:
            return self.dataset_sha256
        return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()

    def check_shape(self, image_size: int, channels: int, rerun: str) -> None:
        """UserError unless the shards hold `channels` x `image_size` px images."""
        if (self.image_size, self.channels) != (image_size, channels):
            raise UserError(
                f"shards hold {self.image_size}px images with {self.channels} channel(s), "
                f"{rerun} expects {image_size}px/{channels}: rerun prepare (or {rerun})"
            )

    def metrics(self) -> dict[str, Any]:
        return {"skipped": self.skipped_total}


@dataclass(frozen=True)
class GeneratorRecord(Record):
    """models/generator.json, written by `train`: the generator's shape and weights hash."""

    RELATIVE_PATH: ClassVar[Path] = files_layout.GENERATOR_RECORD
    STAGE: ClassVar[str] = "train"

    spec: dict[str, int]  # GeneratorSpec.to_dict()
    steps: int
    images_seen: int
    sha256: str
    # generator.pt holds the weight average with this half-life (0: the last step's weights,
    # the same as generator_raw.pt).
    ema_half_life_images: int = 0
    raw_sha256: str | None = None  # of generator_raw.pt, the last step's weights

    def verified_weights(self, layout: Layout) -> Path:
        """models/generator.pt, checked against `sha256`."""
        verify_sha256(layout.generator_weights, self.sha256, self.path(layout), self.STAGE)
        return layout.generator_weights

    def verified_raw_weights(self, layout: Layout) -> Path | None:
        """models/generator_raw.pt (the last step's weights), checked against `raw_sha256`;
        None for a record written before the raw generator was kept."""
        if self.raw_sha256 is None:
            return None
        verify_sha256(layout.raw_generator_weights, self.raw_sha256, self.path(layout),
                      self.STAGE)
        return layout.raw_generator_weights


@dataclass(frozen=True)
class ClassifierRecord(Record):
    """models/classifier/spec.json, written by the `classifier` stage: the domain classifier's
    architecture, weights hash and accuracy, or why none was trained."""

    RELATIVE_PATH: ClassVar[Path] = (
        files_layout.CLASSIFIER_DIR / files_layout.CLASSIFIER_RECORD_NAME
    )
    STAGE: ClassVar[str] = "classifier"

    skipped: bool
    reason: str | None = None
    arch: dict[str, int] | None = None
    num_classes: int | None = None
    feature_dim: int | None = None
    sha256: str | None = None
    val_accuracy: float | None = None
    val_samples: int | None = None
    train_samples: int | None = None
    epochs: int | None = None
    train_seconds: float | None = None
    dataset_sha256: str | None = None
    class_names: list[str] | None = None
    # Below classifier.min_val_accuracy with on_below_min=weak: it still serves, and every
    # FID and coverage measured with it says "weak" (why, here).
    weak_reason: str | None = None

    def verified_weights(self, layout: Layout) -> Path:
        """models/classifier/weights.pt, checked against `sha256`; UserError when skipped."""
        if self.skipped:
            raise UserError(f"no domain classifier: the classifier stage skipped ({self.reason})")
        verify_sha256(layout.classifier_weights, self.sha256, self.path(layout), self.STAGE)
        return layout.classifier_weights

    def metrics(self) -> dict[str, Any]:
        return {"val_accuracy": self.val_accuracy}  # None (null) when skipped


# A final FID this much above the run's best counts as "got worse at the end": about twice the
# seed-to-seed spread of the in-training FID measured on mnist5k (BENCHMARKS.md, "Time to
# quality").
WORSE_AT_END_FRACTION = 0.15


@dataclass(frozen=True)
class QualitySummary:
    """Where a run's quality while training was best, its last value, and whether it got worse
    by the end (the `quality` of `TrainRun`)."""

    best_step: int
    best_images_seen: int
    best_fid_classifier: float
    final_fid_classifier: float
    worse_at_end: bool

    @classmethod
    def of_rows(cls, rows: list[dict[str, Any]]) -> QualitySummary | None:
        """The summary of a run's quality rows (None when none were measured)."""
        if not rows:
            return None
        best = min(rows, key=lambda row: row["fid_classifier"])
        best_fid, final_fid = float(best["fid_classifier"]), float(rows[-1]["fid_classifier"])
        return cls(int(best["step"]), int(best["images_seen"]), best_fid, final_fid,
                   worse_at_end=final_fid > best_fid * (1 + WORSE_AT_END_FRACTION))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QualitySummary:
        """Rebuild from `dataclasses.asdict` output; TypeError on a missing key."""
        return _from_known_keys(cls, values)

    def words(self) -> str:
        """One phrase for a run's description and log."""
        best = (f"best in-training FID {self.best_fid_classifier:.2f} at "
                f"{self.best_images_seen:,} images")
        if self.worse_at_end:
            return f"{best}; WORSE AT THE END ({self.final_fid_classifier:.2f})"
        return best


@dataclass(frozen=True)
class TrainRun(Record):
    """reports/train_run.json, written by `train`: where the run lives and how it went."""

    RELATIVE_PATH: ClassVar[Path] = files_layout.TRAIN_RUN
    STAGE: ClassVar[str] = "train"

    mlflow_run_id: str
    mlflow_experiment_id: str
    tracking_uri: str
    ray_run_name: str
    ray_storage_path: str
    final_checkpoint: str
    steps: int
    epochs: int
    steps_per_epoch: int
    images_seen: int
    world_size: int
    generator_sha256: str
    wall_s: float
    worker_node_ids: list[str] = field(default_factory=list)
    resumed_from_steps: list[int] = field(default_factory=list)
    params_identical_across_ranks: bool = True
    final_loss_d: float | None = None
    final_loss_g: float | None = None
    mean_images_per_s: float | None = None
    dataset_sha256: str | None = None  # the data it trained on (data/stats.json)
    ray_job_submission_id: str | None = None  # when run by `ray job submit`
    # Quality while training (reports/train_quality.csv): its summary, rank 0's seconds spent
    # measuring it, or why it was not measured.
    quality: QualitySummary | None = None
    quality_s: float | None = None
    quality_skipped_reason: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        quality = values.get("quality") if isinstance(values, dict) else None
        if quality is not None:
            values = {**values, "quality": QualitySummary.from_dict(quality)}
        return super().from_dict(values)

    def metrics(self) -> dict[str, Any]:
        return {"steps": self.steps, "images_per_s": round(self.mean_images_per_s or 0.0, 1),
                "wall_s": self.wall_s}


COMPARED_SCORE_PREFIXES = ("fid_", "kid_", "class_coverage")


@dataclass(frozen=True)
class Evaluation(Record):
    """reports/evaluation.json, written by `evaluate`, read by `register`: the scores and what
    they were measured with (extractor, its hash, N)."""

    RELATIVE_PATH: ClassVar[Path] = files_layout.EVALUATION
    STAGE: ClassVar[str] = "evaluate"

    feature_extractor: str  # inception | classifier | none
    num_samples: int
    num_real_samples: int
    floor_num_samples: int
    kid_subset_size: int
    generator_steps: int
    scores: dict[str, float]  # fid_<x>, kid_<x>, floors, classifier_score, class coverage
    feature_extractor_sha256: str | None = None
    mode_collapse: bool | None = None
    class_histogram: list[int] | None = None
    fid_skipped_reason: str | None = None
    class_metrics_skipped_reason: str | None = None
    # The classifier is below its accuracy bar: its FID and coverage are rough (why, here).
    weak_classifier_reason: str | None = None

    def classes_hit_words(self) -> str:
        """`<hit>/<classes> classes` of the class coverage measurement."""
        hit = int(self.scores.get("classes_hit", 0))
        return f"{hit}/{len(self.class_histogram or [])} classes"

    def metrics(self) -> dict[str, Any]:
        """FID/KID and their floors, class coverage and the collapse verdict (the full scores,
        the last weights' FID among them, stay in the record and the MLflow run)."""
        compared = {key: value for key, value in self.scores.items()
                    if key.startswith(COMPARED_SCORE_PREFIXES)
                    and not key.endswith(("_std", "_raw"))}
        collapse = {} if self.mode_collapse is None else {"mode_collapse": self.mode_collapse}
        return {**compared, **collapse}


@dataclass(frozen=True)
class RegistryRecord(Record):
    """reports/registry.json, written by `register`: the version registered and whether it took
    the alias (`alias_withheld`: why not, when its evaluation says it is not worth promoting)."""

    RELATIVE_PATH: ClassVar[Path] = files_layout.REGISTRY_RECORD
    STAGE: ClassVar[str] = "register"
    SORT_KEYS: ClassVar[bool] = True

    name: str
    version: str
    uri: str
    alias: str
    alias_withheld: str | None = None
