"""Fault injection for tests: fail once at a given step on a given rank.

`DCGAN_FAULT_INJECT="step=30,rank=1,mode=raise|exit|hang"` is read once, by the driver's
preflight, and travels to the workers inside their plan. A marker file in the run's storage
makes it fire once per run: the restarted worker group trains on. `hang` pauses the rank for
`seconds` (default 300) after its marker is written, then trains on: a test interrupts the
driver, or stops the tracking server, at a known step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError

logger = logging.getLogger(__name__)

FAULT_ENV = "DCGAN_FAULT_INJECT"
MODES = ("raise", "exit", "hang")
HANG_S = 300


class InjectedFaultError(RuntimeError):
    """The failure `DCGAN_FAULT_INJECT` asks for."""


@dataclass(frozen=True)
class FaultSpec:
    """Fail once at `step` on `rank`: raise an exception, or hard-exit the process."""

    step: int
    rank: int
    mode: str
    seconds: float = HANG_S  # how long `hang` pauses

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse "step=30,rank=1,mode=raise" (hang: also ",seconds=S"); UserError on
        anything else."""
        try:
            fields = dict(part.split("=", 1) for part in text.split(","))
            spec = cls(int(fields["step"]), int(fields.get("rank", 0)), fields.get("mode", "raise"),
                       float(fields.get("seconds", HANG_S)))
        except (KeyError, ValueError):
            spec = None
        if spec is None or spec.mode not in MODES or spec.step < 1 or spec.seconds < 0:
            raise UserError(f"{FAULT_ENV}={text!r}: expected "
                            "step=N,rank=R,mode=raise|exit|hang[,seconds=S]")
        return spec

    def is_due(self, step: int, rank: int, marker: Path) -> bool:
        """True at this spec's step and rank, unless it already fired in this run."""
        return step == self.step and rank == self.rank and not marker.exists()

    def fire(self, step: int, rank: int, marker: Path) -> None:
        """Record the firing in `marker`, then raise, hard-exit (as a killed worker) or pause."""
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"step={step} rank={rank} mode={self.mode}\n")
        logger.warning("fault injection: %s at step %d on rank %d", self.mode, step, rank)
        if self.mode == "hang":
            time.sleep(self.seconds)
            return
        if self.mode == "exit":
            os._exit(1)  # no cleanup, no exception
        raise InjectedFaultError(f"injected fault at step {step} on rank {rank}")


def fault_from_env(environ: dict[str, str]) -> FaultSpec | None:
    """The fault asked for in `environ`, if any (driver side)."""
    text = environ.get(FAULT_ENV, "")
    return FaultSpec.parse(text) if text else None
