"""Replay: base model + ledger -> the parameters at any step, with no forward passes.

Every replica applied exactly the ledger's (seed, coefficient) pairs with
``apply_update``; replay applies the same pairs with the same function in the
same order, so its digest equals the trained one bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import FIRST_ORDER
from .engine import ReplicaEngine
from .ledger import Ledger, LedgerError, read_table, table_rows, updates_by_step
from .run_dir import RunDirectory


@dataclass(frozen=True)
class ReplayResult:
    """The replayed model's digest and what it took."""

    step: int
    digest: str
    seconds: float
    engine: ReplicaEngine


def replay_run(run_dir: str | Path, step: int | None = None) -> ReplayResult:
    """Rebuild the base model of a run and apply its ledger up to ``step`` (default: all).

    Raises:
        LedgerError: the ledger is unreadable, incomplete, or ``step`` is beyond it.
        ConfigError: config.yaml is missing or invalid.
    """
    run_dir = Path(run_dir)
    config = RunDirectory.load_config(run_dir)
    if config.optimizer.name in FIRST_ORDER:
        raise LedgerError("first-order runs (sgd, adamw) have no directions to replay; their checkpoints "
                          "hold the parameters")
    rows = table_rows(read_table(run_dir / "ledger.parquet"))
    updates = updates_by_step(rows)
    last = updates[-1][0] if updates else 0
    target = last if step is None else step
    if target > last or target < 0:
        raise LedgerError(f"--step {target} is outside the ledger (steps 0..{last})")
    engine = ReplicaEngine(config.replace({"cluster.use_ray": False}))
    started = time.perf_counter()
    engine.replay([u for u in updates if u[0] <= target])
    seconds = time.perf_counter() - started
    return ReplayResult(target, engine.digest(), seconds, engine)


__all__ = ["ReplayResult", "replay_run", "Ledger"]
