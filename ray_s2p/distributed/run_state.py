"""What a training run carries from step to step, and what it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RayS2PError
from ..zo.ledger import Ledger
from .checkpoint import Checkpoint
from .messages import Update


class TrainingError(RayS2PError, RuntimeError):
    """The run cannot continue (too many failures, non-finite losses, replica mismatch)."""


@dataclass
class TrainResult:
    """What ``train`` returns (also written to summary.json)."""

    run_dir: Path
    final_digest: str
    steps_completed: int
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """What one run carries from step to step (the driver's only mutable run state).

    ``start_step`` is where this run (or resume) began; ``pending`` the last step's update,
    which the replicas apply with the next request (or earlier, ``Driver._apply``); ``ckpt`` the newest
    checkpoint, the base that recovery restores from before replaying the ledger.
    """

    start_step: int
    rule_state: Any
    ledger: Ledger
    ckpt: Checkpoint | None
    forward_passes: int
    wall_before: float
    pending: Update | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    started: float = field(default_factory=time.perf_counter)  # reset by the driver once replicas are up
    wall: float = 0.0  # wall seconds when the last step was recorded
    initial_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = 0  # the step ``last_eval`` was taken at (what the progress bar labels it with)
    startup_seconds: float = 0.0  # from the run's start to the replicas being up (not in ``wall``)

    @property
    def decided(self) -> int:
        """The last step whose update is in the ledger: what a replacement replica is caught up to."""
        return self.pending.step if self.pending is not None else self.start_step

    def elapsed(self) -> float:
        """Wall seconds of the run so far, earlier runs of a resumed run included."""
        return self.wall_before + time.perf_counter() - self.started


@dataclass(frozen=True)
class StepOutcome:
    """One step's numbers for the metrics row."""

    loss: float
    sent: int
    received: int
    passes: int
    skipped: int
