"""What every benchmark shares: machine facts, interleaved timing, synthetic images and shards.

Timings on a shared machine are noisy, so every comparison runs both sides in the same process,
alternating repeat by repeat (A B A B ...), and reports medians and the median of the per-pair
ratios: a load that comes and goes hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import Config, DataConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results.json"
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
SHAPES = {"32x32x1": (32, 1), "64x64x3": (64, 3)}

# No network, no telemetry (Ray, MLflow) in any benchmark.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")


# --- the machine ------------------------------------------------------------------------------


def cpu_flags() -> dict[str, bool]:
    """Which of the flags that matter for bf16 speed /proc/cpuinfo shows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST}


def has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    flags = cpu_flags()
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def machine() -> dict[str, Any]:
    """CPU model, cores, load and library versions: what a reader needs to compare figures."""
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines()
             if line.startswith("Model name")), model,
        )
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "webdataset", "mlflow", "PIL", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "load_average_1_5_15": list(os.getloadavg()),
        "torch_config_isa": torch.backends.cpu.get_cpu_capability(),
        "versions": versions,
    }


# --- timing -----------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(
    sides: dict[str, Callable[[], float]], repeats: int
) -> dict[str, list[float]]:
    """Call each side once per repeat, in turn (A B A B ...); each returns its own rate."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            rates[name].append(run())
    return rates


def summarise(rates: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of rates (rounded for reading)."""
    return {
        "median": round(statistics.median(rates), 1),
        "min": round(min(rates), 1),
        "max": round(max(rates), 1),
        "runs": len(rates),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-repeat ratios (each pair ran back to back, under the same load)."""
    return round(statistics.median(a / b for a, b in zip(numerator, denominator, strict=True)), 3)


def print_row(label: str, value: Any) -> None:
    """One figure, aligned."""
    print(f"  {label:<58} {value}", flush=True)


# --- configs ----------------------------------------------------------------------------------


def bench_config(image_size: int, channels: int, overrides: Sequence[str] = ()) -> Config:
    """params.yaml with the benchmark's data shape; model widths, batch, lr as the product's."""
    settings = [f"data.image_size={image_size}", f"data.channels={channels}", *overrides]
    return load_config(REPO_ROOT / "params.yaml", settings)


# --- synthetic data ---------------------------------------------------------------------------


def synthetic_image(rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
    """A smooth random image (uint8, side x side [x 3]): blobs and gradients, so that PNG
    compresses it like a photo or a digit rather than like noise."""
    coarse = rng.integers(0, 256, size=(6, 6, channels), dtype=np.uint8)
    ys = np.linspace(0, 5, side)
    # Bilinear upsampling of a 6x6 grid: smooth, cheap, and different for every image.
    y0 = np.floor(ys).astype(int).clip(0, 4)
    fy = (ys - y0)[:, None, None]
    rows = coarse[y0] * (1 - fy) + coarse[y0 + 1] * fy
    fx = (ys - y0)[None, :, None]
    image = rows[:, y0] * (1 - fx) + rows[:, y0 + 1] * fx
    image = image.astype(np.uint8)
    return image[:, :, 0] if channels == 1 else image


def make_image_folder(folder: Path, count: int, side: int, channels: int, seed: int = 0,
                      fmt: str = "png") -> Path:
    """`count` image files (`fmt`: png, or jpeg at quality 90) of `side` px in 10 class
    sub-folders (labelled, like a user's folder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    suffix, options = ("jpg", {"quality": 90}) if fmt == "jpeg" else ("png", {"compress_level": 6})
    for index in range(count):
        target = folder / f"class_{index % 10}" / f"img_{index:06d}.{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_image(rng, side, channels)).save(target, **options)
    return folder


def make_shards(root: Path, source: str, image_size: int, channels: int,
                num_processes: int = 1) -> dict[str, Any]:
    """Run the product's `prepare` on `source` into `root` (data/shards, stats); its stats."""
    from pipeline.core.layout import Layout
    from pipeline.data.prepare import prepare_dataset

    cfg = DataConfig(source=source, image_size=image_size, channels=channels,
                     num_processes=num_processes)
    return prepare_dataset(cfg, Layout(root)).to_dict()


def save_results(section: str, results: dict[str, Any], path: Path = RESULTS_PATH) -> None:
    """Merge one benchmark's results into benchmarks/results.json."""
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[section] = results
    merged["machine"] = machine()
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
