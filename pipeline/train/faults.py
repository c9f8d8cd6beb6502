"""Fault injection for tests: fail once at a given step on a given rank.

`DCGAN_FAULT_INJECT="step=30,rank=1,mode=raise|exit"` is read once, by the driver's preflight,
and travels to the workers inside their plan. A marker file in the run's storage makes it fire
once per run: the restarted worker group trains on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError

logger = logging.getLogger(__name__)

FAULT_ENV = "DCGAN_FAULT_INJECT"


class InjectedFaultError(RuntimeError):
    """The failure `DCGAN_FAULT_INJECT` asks for."""


@dataclass(frozen=True)
class FaultSpec:
    """Fail once at `step` on `rank`: raise an exception, or hard-exit the process."""

    step: int
    rank: int
    mode: str

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse "step=30,rank=1,mode=raise"; UserError on anything else."""
        try:
            fields = dict(part.split("=", 1) for part in text.split(","))
            spec = cls(int(fields["step"]), int(fields.get("rank", 0)), fields.get("mode", "raise"))
        except (KeyError, ValueError):
            spec = None
        if spec is None or spec.mode not in ("raise", "exit") or spec.step < 1:
            raise UserError(f"{FAULT_ENV}={text!r}: expected step=N,rank=R,mode=raise|exit")
        return spec

    def is_due(self, step: int, rank: int, marker: Path) -> bool:
        """True at this spec's step and rank, unless it already fired in this run."""
        return step == self.step and rank == self.rank and not marker.exists()

    def fire(self, step: int, rank: int, marker: Path) -> None:
        """Record the firing in `marker`, then raise or hard-exit (as a killed worker)."""
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"step={step} rank={rank} mode={self.mode}\n")
        logger.warning("fault injection: %s at step %d on rank %d", self.mode, step, rank)
        if self.mode == "exit":
            os._exit(1)  # no cleanup, no exception
        raise InjectedFaultError(f"injected fault at step {step} on rank {rank}")


def fault_from_env(environ: dict[str, str]) -> FaultSpec | None:
    """The fault asked for in `environ`, if any (driver side)."""
    text = environ.get(FAULT_ENV, "")
    return FaultSpec.parse(text) if text else None
