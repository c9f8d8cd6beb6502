"""The FID Inception v3: the network of the standard FID (TensorFlow's 2015-12-05 Inception
graph, converted to PyTorch by pytorch-fid and torch-fidelity; both publish the same file).

It is rebuilt here without torchvision, which is not installable beside this project's torch,
so that the official weights load into it with `weights_only=True` and its 2048-d pool
features match pytorch-fid's. Nothing is downloaded: the file must be on disk.

Architecture: torchvision's Inception3 (BSD-3-Clause) with the changes pytorch-fid
(github.com/mseitzer/pytorch-fid, src/pytorch_fid/inception.py, Apache-2.0) and torch-fidelity
(github.com/toshas/torch-fidelity, Apache-2.0) make so that it computes what TensorFlow's FID
graph computes: average pools that ignore padding, a max pool in the last block, 1008 classes.
Written here from that description (module names are the state-dict keys of the weights file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from pipeline.core.config import EvalConfig
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file

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


def inception_search_paths(eval_cfg: EvalConfig, root: Path) -> list[Path]:
    """Where the Inception weights are looked for, in order: `eval.inception_weights` alone
    when set (relative to `root`), else both file names in $TORCH_HOME/hub/checkpoints
    (~/.cache/torch/...)."""
    if eval_cfg.inception_weights:
        return [root / Path(eval_cfg.inception_weights).expanduser()]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [checkpoints / name for name in INCEPTION_FILENAMES]


def missing_inception_message(eval_cfg: EvalConfig, root: Path) -> str:
    """One line: where the weights were looked for and the ways out."""
    places = " or ".join(str(p) for p in inception_search_paths(eval_cfg, root))
    return (
        f"FID Inception weights not found at {places}: put pytorch-fid's "
        f"{INCEPTION_FILENAMES[0]} (or torch-fidelity's {INCEPTION_FILENAMES[1]}) there, or "
        "set eval.inception_weights=PATH, or eval.feature_extractor=classifier"
    )


def find_inception_weights(eval_cfg: EvalConfig, root: Path) -> Path | None:
    """The first Inception weights file that exists, or None (nothing is downloaded)."""
    return next((p for p in inception_search_paths(eval_cfg, root) if p.is_file()), None)


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
