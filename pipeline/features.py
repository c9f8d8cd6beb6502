"""Feature extractors for FID/KID: the domain classifier and the standard FID Inception v3.

Two extractors, one interface (`FeatureExtractor`): images (N, C, H, W) in [-1, 1] at the
dataset's size -> features (N, D) float32; `num_features` tells D (torchmetrics reads it).

* The **domain classifier** is a small CNN that the `featurize` stage trains on the labelled
  train shards. Its penultimate embedding is the feature; its logits give the classifier score
  and class coverage. FIDs measured with it are on their own scale (`fid_classifier`).
* The **FID Inception v3** is the network of the standard FID (TensorFlow's 2015-12-05
  Inception graph, converted to PyTorch by pytorch-fid and torch-fidelity; both publish the
  same file). It is rebuilt here without torchvision, which is not installable for this
  project, so that the official weights load into it with `weights_only=True` and its 2048-d
  pool features match pytorch-fid's. Nothing is downloaded: the file must be on disk.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from tqdm import tqdm

from pipeline import data, paths
from pipeline.cli import UserError
from pipeline.config import Config, EvalConfig, FeaturizeConfig
from pipeline.files import sha256_file

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels a PNG holds, so that generated images are
    measured as they would be saved (real ones come from PNGs and are already on them)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# --- the domain classifier ----------------------------------------------------------------------

CLASSIFIER_WIDTH = 32  # channels of the first conv block; doubled per block, capped below
CLASSIFIER_MAX_WIDTH = 256
CLASSIFIER_FEATURE_DIM = 128
CLASSIFIER_END_SIDE = 4  # conv blocks halve the side down to 4x4
SHIFT_PX = 2  # augmentation: random translations of up to this many pixels
LABEL_SMOOTHING = 0.1  # measured on mnist5k: 98.4 % val accuracy with it, 98.2 % without


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild the classifier (saved in models/classifier/spec.json)."""

    image_size: int
    channels: int
    num_classes: int
    width: int = CLASSIFIER_WIDTH
    feature_dim: int = CLASSIFIER_FEATURE_DIM

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierSpec:
        """Rebuild from `asdict` output (unknown keys are an error)."""
        return cls(**values)


class DomainClassifier(nn.Module):
    """Conv(3x3)-BN-ReLU-MaxPool blocks down to 4x4, then a `feature_dim` embedding and a
    linear head. `forward` returns the embedding (the FID feature); `logits` the class scores."""

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_features = spec.feature_dim
        blocks: list[nn.Module] = []
        channels_in, width = spec.channels, spec.width
        for _ in range(int(math.log2(spec.image_size // CLASSIFIER_END_SIDE))):
            blocks += [
                nn.Conv2d(channels_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels_in, width = width, min(width * 2, CLASSIFIER_MAX_WIDTH)
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.embed = nn.Sequential(
            nn.Linear(channels_in * CLASSIFIER_END_SIDE**2, spec.feature_dim), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(spec.feature_dim, spec.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes)."""
        return self.head(self(images))


def random_shift(images: torch.Tensor, max_px: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dx, dy) in [-max_px, max_px], filling with the
    edge pixels (the background of most datasets) - light augmentation for small data."""
    count, _, height, width = images.shape
    padded = F.pad(images, (max_px,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_px + 1, (count,), generator=generator)
    dy = torch.randint(0, 2 * max_px + 1, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    channels = images.shape[1]
    padded = padded.gather(2, rows.expand(count, channels, height, padded.shape[3]))
    return padded.gather(3, cols.expand(count, channels, height, width))


def accuracy(model: DomainClassifier, batches: Batches) -> tuple[float, int]:
    """(share of correctly classified samples, number of samples) over labelled batches."""
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += int((model.logits(images).argmax(1) == labels).sum())
            seen += len(images)
    return (correct / seen if seen else float("nan")), seen


def fit_classifier(
    spec: ClassifierSpec,
    epoch_batches: Callable[[int], Batches],
    steps_per_epoch: int,
    fcfg: FeaturizeConfig,
) -> DomainClassifier:
    """Train a classifier: Adam with a one-cycle schedule peaking at `fcfg.lr` (few epochs
    reach a good optimum), random shifts and label smoothing against overfitting small data.
    `epoch_batches(epoch)` yields the (images, labels) batches of one epoch."""
    torch.manual_seed(fcfg.seed)
    shifts = torch.Generator().manual_seed(fcfg.seed)
    model = DomainClassifier(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=fcfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=fcfg.lr, total_steps=fcfg.epochs * steps_per_epoch
    )
    for epoch in range(fcfg.epochs):
        model.train()
        progress = tqdm(epoch_batches(epoch), total=steps_per_epoch, unit="batch",
                        desc=f"classifier epoch {epoch + 1}/{fcfg.epochs}")
        for images, labels in progress:
            logits = model.logits(random_shift(images, SHIFT_PX, shifts))
            loss = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_classifier(
    model: DomainClassifier, directory: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """Write weights.pt (plain state_dict) and spec.json (arch, hash, `extra`); return the spec
    record."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / paths.CLASSIFIER_WEIGHTS.name
    torch.save(model.state_dict(), weights)
    record = {
        "skipped": False,
        "arch": asdict(model.spec),
        "num_classes": model.spec.num_classes,
        "feature_dim": model.spec.feature_dim,
        "sha256": sha256_file(weights),
        **extra,
    }
    (directory / paths.CLASSIFIER_SPEC.name).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_classifier_spec(directory: Path = paths.CLASSIFIER_DIR) -> dict[str, Any] | None:
    """models/classifier/spec.json, or None when featurize has not run."""
    spec_path = directory / paths.CLASSIFIER_SPEC.name
    return json.loads(spec_path.read_text()) if spec_path.exists() else None


def load_classifier(directory: Path = paths.CLASSIFIER_DIR) -> tuple[DomainClassifier, str]:
    """The trained classifier (eval mode) and its weights' SHA-256, checked against spec.json."""
    record = read_classifier_spec(directory)
    if record is None:
        raise UserError(f"{directory / 'spec.json'} not found: run `dvc repro featurize` first")
    if record.get("skipped"):
        raise UserError(f"no domain classifier: featurize skipped it ({record.get('reason')})")
    weights = directory / paths.CLASSIFIER_WEIGHTS.name
    if not weights.exists():
        raise UserError(f"{weights} not found: run `dvc repro featurize` again")
    digest = sha256_file(weights)
    if digest != record["sha256"]:
        raise UserError(f"{weights}: SHA-256 differs from spec.json; re-run `dvc repro featurize`")
    model = DomainClassifier(ClassifierSpec.from_dict(record["arch"]))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), digest


def featurize(cfg: Config) -> dict[str, Any]:
    """The `featurize` stage: train the domain classifier on the labelled train shards, check
    it on val, save it under models/classifier and its report to reports/featurize.json.
    Unlabelled data: write only spec.json (and the report) saying why nothing was trained."""
    stats = data.read_stats()
    directory = paths.CLASSIFIER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / paths.CLASSIFIER_WEIGHTS.name).unlink(missing_ok=True)  # never a stale model
    num_classes = stats.get("num_classes") or 0
    reason = None
    if not stats.get("labelled"):
        reason = "the data source has no labels"
    elif num_classes < 2:
        reason = f"the data source has {num_classes} class(es); a classifier needs 2 or more"
    if reason:
        record = {"skipped": True, "reason": reason}
        (directory / paths.CLASSIFIER_SPEC.name).write_text(json.dumps(record, indent=2) + "\n")
        _write_report(record)
        log.info("featurize skipped: %s", reason)
        return record

    fcfg = cfg.featurize
    train_urls = data.shard_urls("train", cfg.train.shards)
    val_urls = data.shard_urls("val", cfg.train.shards)
    train_samples = stats["splits"]["train"]["samples"]
    steps = data.steps_per_epoch(train_samples, fcfg.batch_size, 1)
    spec = ClassifierSpec(stats["image_size"], stats["channels"], num_classes)
    started = time.monotonic()

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return data.train_batches(
            train_urls, batch_size=fcfg.batch_size, rank=0, world_size=1, num_batches=steps,
            seed=fcfg.seed, epoch=epoch, with_labels=True,
        )

    model = fit_classifier(spec, epoch_batches, steps, fcfg)
    val_accuracy, val_samples = accuracy(
        model, data.iter_split(val_urls, batch_size=256, with_labels=True)
    )
    seconds = time.monotonic() - started
    if not val_accuracy >= fcfg.min_val_accuracy:  # `not >=` also catches NaN (empty val)
        raise UserError(
            f"domain classifier reached {val_accuracy:.4f} val accuracy on {val_samples} "
            f"samples, below featurize.min_val_accuracy={fcfg.min_val_accuracy}: raise "
            "featurize.epochs or lower the threshold"
        )
    extra = {
        "val_accuracy": round(val_accuracy, 6),
        "val_samples": val_samples,
        "train_samples": train_samples,
        "epochs": fcfg.epochs,
        "dataset_sha256": stats.get("dataset_sha256"),
        "class_names": stats.get("class_names"),
    }
    record = save_classifier(model, directory, extra)
    _write_report({**record, "train_seconds": round(seconds, 1)})
    log.info("classifier: %.4f val accuracy on %d samples (%.0f s)", val_accuracy, val_samples,
             seconds)
    return record


def _write_report(record: dict[str, Any]) -> None:
    keep = ("skipped", "reason", "val_accuracy", "val_samples", "train_samples", "epochs",
            "feature_dim", "num_classes", "sha256", "train_seconds")
    paths.FEATURIZE_METRICS.parent.mkdir(parents=True, exist_ok=True)
    report = {key: record[key] for key in keep if key in record}
    paths.FEATURIZE_METRICS.write_text(json.dumps(report, indent=2) + "\n")


# --- the FID Inception v3 -----------------------------------------------------------------------
#
# Architecture: torchvision's Inception3 (BSD-3-Clause) with the changes pytorch-fid
# (github.com/mseitzer/pytorch-fid, src/pytorch_fid/inception.py, Apache-2.0) and torch-fidelity
# (github.com/toshas/torch-fidelity, Apache-2.0) make so that it computes what TensorFlow's FID
# graph computes: average pools that ignore padding, a max pool in the last block, 1008 classes.
# Written here from that description (module names are the state-dict keys of the weights file).

INCEPTION_FILENAMES = (
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity
)
# Both releases are the same 95,628,359-byte file (566 tensors); its full SHA-256:
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_INPUT_PX = 299
INCEPTION_FEATURES = 2048
INCEPTION_MAX_BATCH = 64  # ~1 GB of activations per pass at 299 px


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as TensorFlow) -> ReLU."""

    def __init__(self, channels_in: int, channels_out: int, kernel: Any, stride: int = 1,
                 padding: Any = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(channels_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, channels_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(channels_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(channels_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(channels_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(channels_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, channels_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(channels_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(channels_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, channels_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) pairs
        self.branch1x1 = BasicConv2d(channels_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(channels_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = BasicConv2d(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = BasicConv2d(channels_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, row[0], padding=row[1])
        self.branch_pool = BasicConv2d(channels_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5),
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, channels_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(channels_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(channels_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                   self.branch7x7x3_4),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches; the FID graph's last one max-pools."""

    def __init__(self, channels_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(channels_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(channels_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(channels_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(channels_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.branch3x3_1(x)
        double = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        # A quirk of TensorFlow's FID graph, kept for identical numbers: max, not average.
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(split), self.branch3x3_2b(split),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception v3 of the standard FID: images in [-1, 1], any size, 1 or 3 channels ->
    (N, 2048) pool features. Always in eval mode (BatchNorm uses the stored statistics)."""

    num_features = INCEPTION_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(INCEPTION_FEATURES, 1008)  # unused for FID; part of the file
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # a fixed measuring instrument

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) > INCEPTION_MAX_BATCH:  # 299 px activations: bound the memory per pass
            return torch.cat([self(part) for part in torch.split(images, INCEPTION_MAX_BATCH)])
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: the same plane on R, G and B
        # pytorch-fid: bilinear resize to 299 (no antialias), inputs scaled to [-1, 1].
        x = F.interpolate(x, size=(INCEPTION_INPUT_PX, INCEPTION_INPUT_PX), mode="bilinear",
                          align_corners=False)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                   self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                   self.Mixed_7c)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def inception_search_paths(eval_cfg: EvalConfig) -> list[Path]:
    """Where the Inception weights are looked for, in order: `eval.inception_weights` alone
    when set, else both file names in $TORCH_HOME/hub/checkpoints (~/.cache/torch/...)."""
    if eval_cfg.inception_weights:
        return [Path(eval_cfg.inception_weights).expanduser()]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [checkpoints / name for name in INCEPTION_FILENAMES]


def _missing_inception_message(eval_cfg: EvalConfig) -> str:
    places = " or ".join(str(p) for p in inception_search_paths(eval_cfg))
    return (
        f"FID Inception weights not found at {places}: put pytorch-fid's "
        f"{INCEPTION_FILENAMES[0]} (or torch-fidelity's {INCEPTION_FILENAMES[1]}) there, or "
        "set eval.inception_weights=PATH, or eval.feature_extractor=classifier"
    )


def find_inception_weights(eval_cfg: EvalConfig) -> Path | None:
    """The first Inception weights file that exists, or None (nothing is downloaded)."""
    return next((p for p in inception_search_paths(eval_cfg) if p.is_file()), None)


def load_inception(
    path: str | Path, expected_sha256: str = INCEPTION_SHA256
) -> tuple[FIDInceptionV3, str]:
    """The FID Inception with the weights at `path`, checked by SHA-256 first; returns
    (model, sha256). UserError (one line) if the file is missing, differs or does not fit."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"FID Inception weights not found at {path}: put pytorch-fid's "
            f"{INCEPTION_FILENAMES[0]} there (or fix eval.inception_weights)"
        )
    digest = sha256_file(path)
    if digest != expected_sha256:
        raise UserError(
            f"{path}: SHA-256 {digest[:16]}... is not that of the FID Inception weights "
            f"({expected_sha256[:16]}...): replace it with pytorch-fid's {INCEPTION_FILENAMES[0]}"
        )
    model = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: not an FID Inception v3 state dict ({first})") from err
    return model.eval(), digest


# --- choosing the extractor ---------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """The extractor evaluate uses: its name (`classifier`/`inception`), weights hash, module,
    and, for the classifier, a function from images to logits."""

    name: str
    sha256: str
    module: nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None


def resolve_extractor_name(eval_cfg: EvalConfig, classifier_dir: Path = paths.CLASSIFIER_DIR
                           ) -> tuple[str | None, str]:
    """Which extractor to use, decided cheaply before any work: ('inception' | 'classifier' |
    None, why). None means no FID can be computed (the reason says why); a choice that cannot
    work raises UserError naming the file to provide."""
    choice = eval_cfg.feature_extractor
    weights = find_inception_weights(eval_cfg)
    if choice == "inception" or (choice == "auto" and weights is not None):
        if weights is None:
            raise UserError(_missing_inception_message(eval_cfg))
        return "inception", f"Inception weights at {weights}"
    if choice == "auto" and eval_cfg.inception_weights:
        raise UserError(_missing_inception_message(eval_cfg))  # asked for a file that is not there
    record = read_classifier_spec(classifier_dir)
    if record is None:
        raise UserError(f"{classifier_dir / 'spec.json'} not found: run `dvc repro featurize`")
    if record.get("skipped"):
        places = " or ".join(str(p) for p in inception_search_paths(eval_cfg))
        why = (
            f"no FID: no Inception weights (put {INCEPTION_FILENAMES[0]} at {places}) and no "
            f"domain classifier ({record.get('reason')})"
        )
        if choice == "classifier":
            raise UserError(f"eval.feature_extractor=classifier, but {why}")
        return None, why
    return "classifier", "the domain classifier trained by featurize"


def build_extractor(name: str, eval_cfg: EvalConfig,
                    classifier_dir: Path = paths.CLASSIFIER_DIR) -> FeatureExtractor:
    """Load the extractor `resolve_extractor_name` chose."""
    if name == "inception":
        weights = find_inception_weights(eval_cfg)
        if weights is None:
            raise UserError(_missing_inception_message(eval_cfg))
        model, digest = load_inception(weights)
        return FeatureExtractor("inception", digest, model)
    model, digest = load_classifier(classifier_dir)
    return FeatureExtractor("classifier", digest, model, logits=model.logits)


def extract(
    module: nn.Module, images: Iterable[torch.Tensor], device: torch.device, desc: str,
    total: int | None = None, logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (N, D) float64 (and logits, when given a logits function) of image batches."""
    features, scores = [], []
    module.to(device).eval()
    with torch.no_grad():
        for batch in tqdm(images, desc=desc, unit="batch", total=total):
            batch = quantize(batch).to(device)
            features.append(module(batch).double().cpu())
            if logits is not None:
                scores.append(logits(batch).double().cpu())
    return torch.cat(features), (torch.cat(scores) if logits is not None else None)
