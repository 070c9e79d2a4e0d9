"""Replay: base model + ledger -> the parameters at any step, with no forward passes.

Every replica applied exactly the ledger's (seed, coefficient) pairs with
``apply_update``; replay applies the same pairs with the same function in the
same order, so its digest equals the trained one bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import FIRST_ORDER
from ..errors import RayS2PError
from ..storage_fs import StoragePath, local_copy, location, walk_files
from ..zo.environment import replay_problem
from ..zo.ledger import Ledger, LedgerError, read_environment, read_table, table_rows, updates_by_step
from .checkpoint import checkpoint_path, load_checkpoint
from .engine import ReplicaEngine
from .run_dir import RunDirectory


@dataclass(frozen=True)
class ReplayResult:
    """The replayed model's digest and what it took."""

    step: int
    digest: str
    seconds: float
    engine: ReplicaEngine


class EnvironmentMismatch(RayS2PError, RuntimeError):
    """A bitwise check was asked for where the run's bits cannot be reproduced (another device or torch)."""


def replay_run(run_dir: str | Path | StoragePath, step: int | None = None, *, bitwise: bool = False) -> ReplayResult:
    """Rebuild the base model of a run and apply its ledger up to ``step`` (default: all).

    Args:
        run_dir: the run directory: a local path, a URI (file://, s3://, gs://) or a ``StoragePath``.
        bitwise: the caller will compare digests; refuse before replaying when the run recorded
            another device type, kernel family or torch build than this replay's (zo/environment.py).

    Raises:
        LedgerError: the ledger is unreadable, incomplete, or ``step`` is beyond it.
        ConfigError: config.yaml is missing or invalid.
        EnvironmentMismatch: ``bitwise`` and the environments differ.
    """
    run_dir = location(run_dir)
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
    recorded = read_environment(run_dir / "ledger.parquet")
    threads_before = torch.get_num_threads()
    if recorded and recorded.get("threads") and recorded.get("device_type") == "cpu":
        # The run's own thread count: the low-rank update's matrix product gives other bits at another one.
        torch.set_num_threads(int(recorded["threads"]))
    try:
        engine = ReplicaEngine(config.replace({"cluster.use_ray": False}))
        problem = replay_problem(recorded, engine.environment()) if bitwise else None
        if problem:
            raise EnvironmentMismatch(f"{problem}. Fix: compare the replayed parameters with the run's own within "
                                      f"a tolerance: ray-s2p replay {run_dir} --atol 1e-5")
        started = time.perf_counter()
        engine.replay([u for u in updates if u[0] <= target])
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads_before)
    return ReplayResult(target, engine.digest(), seconds, engine)


def compare_to_run(run_dir: str | Path | StoragePath, engine: ReplicaEngine, step: int) -> dict[str, Any]:
    """Largest absolute difference between the replayed trainable parameters and the run's own.

    The reference is the run's checkpoint of ``step`` when it kept one (the trainable parameters
    under their own names), else the final model's safetensors files (``final/``, names as in the
    model's state_dict) when ``step`` is the run's last.

    Returns:
        ``reference`` (what was compared against), ``tensors`` (how many), ``max_abs_diff``.

    Raises:
        LedgerError: there is nothing to compare against, or no trainable parameter is in it.
    """
    from safetensors.torch import load_file

    run_dir = location(run_dir)
    reference: dict[str, torch.Tensor] = {}
    source = ""
    kept = checkpoint_path(run_dir / "checkpoints", step)
    if kept.is_dir():
        _, reference = load_checkpoint(kept)
        source = f"checkpoints/{kept.name}"
    last = (updates_by_step(table_rows(read_table(run_dir / "ledger.parquet"))) or [(0,)])[-1][0]
    if not reference and step == last and (run_dir / "final").is_dir():
        for file in walk_files(run_dir / "final"):
            if file.name.endswith(".safetensors"):
                with local_copy(file) as local:
                    reference.update(load_file(str(local)))
        source = "final/"
    names = [n for n in engine.space.names if n in reference]
    if not names:
        raise LedgerError(f"no parameters of step {step} to compare with in {str(run_dir)!r} (no checkpoint of "
                          f"that step{', and final/ names none of the trainable parameters' if source else ''}). "
                          f"Fix: replay to a step that has a checkpoint, or to the last step")
    params = dict(zip(engine.space.names, engine.space.params))
    worst = max(float((params[n].detach().float().cpu() - reference[n].float()).abs().max()) for n in names)
    return {"reference": source, "tensors": len(names), "max_abs_diff": worst}


__all__ = ["EnvironmentMismatch", "ReplayResult", "compare_to_run", "replay_run", "Ledger"]
