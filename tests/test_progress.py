"""Progress bars outside a terminal (`dvc repro > log`, `ray job logs`, CI): a few plain lines,
not a carriage-return frame per update."""

from __future__ import annotations

import subprocess
import sys

# What the classifier stage does per batch: an update and a new postfix.
BATCHES = """
from pipeline.core.progress import progress
bar = progress(range(2000), desc="epoch 1/1", unit="batch")
for step in bar:
    bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
"""


def test_off_a_terminal_a_bar_is_a_few_lines_without_carriage_returns():
    result = subprocess.run([sys.executable, "-c", BATCHES], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr
    assert 1 <= len(lines) <= 3, lines  # the start, perhaps one on the way, and the end
    assert lines[-1].startswith("epoch 1/1: 100%") and "2000/2000" in lines[-1]
