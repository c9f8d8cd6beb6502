"""Bits follow the CPU's kernels (devtools/kernel_bits.py): the same pass gives the same bits
on one machine, and other bits when the instruction set torch and oneDNN use is capped lower.
This is why a default `make repro` on another CPU reports other FIDs (BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.kernel_bits import kernel_bits

ROOT = Path(__file__).parents[1]
LOWEST = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def bits_printed(env: dict[str, str]) -> dict[str, str]:
    """What `python -m devtools.kernel_bits` prints (`key=value` pairs), run with `env`."""
    result = subprocess.run([sys.executable, "-m", "devtools.kernel_bits"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return dict(pair.split("=", 1) for pair in result.stdout.split())


def test_the_same_kernels_give_the_same_bits_and_lower_ones_other_bits():
    here = kernel_bits()
    if here["cpu_capability"] == "DEFAULT" or any(here[name] for name in LOWEST):
        pytest.skip("this machine already runs the lowest kernels")
    assert kernel_bits() == here
    capped = bits_printed({**os.environ, **LOWEST})
    assert capped["cpu_capability"] == "DEFAULT"
    assert capped["logits"] != here["logits"] and capped["input_grad"] != here["input_grad"]
