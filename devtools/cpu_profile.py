"""A pytest plugin: the machine's CPU time during each test, beside its wall time.

On a machine as small as CI's (2 cores) the suite is CPU-bound, and a test's wall time says
little about what it costs the others: a test that waits on a server costs nothing, one that
starts interpreters costs their imports. The terminal summary lists the tests (setup, call and
teardown together) that kept the machine busiest, from /proc/stat (all processes, the
background stages included; Linux only), and how busy the machine was over the whole run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

STAT = Path("/proc/stat")
SHOWN = 15


def _busy_and_total_s() -> tuple[float, float]:
    """Seconds of CPU time the machine spent busy and in all, since boot."""
    fields = [int(value) for value in STAT.read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


class CpuProfile:
    """Collects (busy CPU s, wall s) per test node id."""

    def __init__(self) -> None:
        self.per_test: dict[str, list[float]] = {}
        self._started: dict[str, tuple[float, float]] = {}
        self._first = _busy_and_total_s()

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self._started[nodeid] = _busy_and_total_s()

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        busy, total = _busy_and_total_s()
        busy_before, total_before = self._started.pop(nodeid, (busy, total))
        cores = os.cpu_count() or 1
        self.per_test[nodeid] = [busy - busy_before, (total - total_before) / cores]

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.per_test:
            return
        busy, total = _busy_and_total_s()
        share = (busy - self._first[0]) / max(total - self._first[1], 1e-9)
        rows = sorted(self.per_test.items(), key=lambda item: -item[1][0])[:SHOWN]
        terminalreporter.write_sep("=", f"busiest {len(rows)} tests (machine CPU s / wall s); "
                                        f"the machine was {share:.0%} busy over the run")
        for nodeid, (cpu_s, wall_s) in rows:
            terminalreporter.write_line(f"{cpu_s:7.1f} / {wall_s:6.1f}  {nodeid}")


def register(config: pytest.Config) -> None:
    """Turn the plugin on for this session (from a conftest's `pytest_configure`)."""
    if STAT.exists():
        config.pluginmanager.register(CpuProfile(), "cpu_profile")
