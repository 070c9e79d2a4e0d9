"""The runs of ``ray-s2p bench speedup``: their keys, the progress file that records them, one training run.

One run per line of the progress file, so a commit of it shows which runs a part added; parts may run at
once on the same file (the file is re-read and merged under a lock before each write).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config_history import fingerprint_data
from ..errors import RayS2PError
from ..files import write_text
from ..sweeps.progress import fingerprint
from .speedup_fit import json_number

VERSION = 1


def run_key(task: str, q: int, m: float, seed: int, split: str, shards: int = 1) -> str:
    """The progress file's key of one run, e.g. ``rt_head/q4/m0.5/seed0/validation``; a run standing for
    ``shards`` data-mode replicas with weak batch scaling ends in ``/data{shards}``."""
    return f"{task}/q{q}/m{m:g}/seed{seed}/{split}" + (f"/data{shards}" if shards > 1 else "")


def run_fingerprint(config: RunConfig) -> str:
    """The fingerprint a run of ``config`` is recorded under (``fingerprint_data``: a rename or a key added at
    its old meaning leaves recorded runs valid)."""
    return fingerprint(fingerprint_data(config.to_dict()))


class SpeedupProgress:
    """The finished runs in one JSON file, saved atomically after every new run; one run per line, so a
    commit of the file shows which runs a part added."""

    def __init__(self, path: str | Path, runs: dict[str, dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.runs = runs or {}

    @classmethod
    def load(cls, path: str | Path) -> SpeedupProgress:
        """The progress in ``path``; empty when the file does not exist.

        Raises:
            ValueError: the file is unreadable or not a speedup progress file of this version.
        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RayS2PError(f"--progress {str(path)!r} is unreadable ({exc}). Fix: restore it, or move it away "
                             f"to start the benchmark from the beginning") from exc
        if not isinstance(data, dict) or data.get("benchmark") != "speedup" or data.get("version") != VERSION:
            raise RayS2PError(f"--progress {str(path)!r} is not a speedup progress file of version {VERSION}. "
                             f"Fix: name another file with --progress")
        return cls(path, dict(data.get("runs", {})))

    def get(self, key: str, fp: str) -> dict[str, Any] | None:
        """The run ``key`` if it was recorded from a config with fingerprint ``fp``."""
        entry = self.runs.get(key)
        return entry if entry is not None and entry.get("fingerprint") == fp else None

    def record(self, key: str, entry: dict[str, Any]) -> None:
        """Keep a finished run and save the file.

        Two parts may run at once on one file (two one-thread processes on a 2-core machine): under an
        exclusive lock the file is read again, and what it holds wins over this process's copy (another
        process may have recorded a run again since this one loaded the file); only ``key`` is new.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            self.runs = {**self.runs, **SpeedupProgress.load(self.path).runs, key: entry}
            lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True, allow_nan=False)}"
                                for k, v in sorted(self.runs.items()))
            write_text(self.path, f'{{"benchmark": "speedup", "version": {VERSION}, "runs": {{\n{lines}\n}}}}\n')


def train_run(cfg: RunConfig, run_dir: Path, keep: bool = False) -> dict[str, Any]:
    """Train one run in-process and return its progress entry (curve, final numbers, error, seconds).

    A run the driver stops (``TrainingError``: non-finite losses, e.g. a step size that diverges) is a
    result, recorded with its error and never reaching the target; any other exception propagates.
    """
    from ..distributed.driver import train
    from ..distributed.run_state import TrainingError

    start = time.perf_counter()
    summary: dict[str, Any] = {}
    error = None
    try:
        summary = train(cfg, run_dir, overwrite=True, log=lambda message: None).summary
    except TrainingError as exc:
        error = " ".join(str(exc).split())[:300]
    seconds = time.perf_counter() - start
    curve = read_curve(run_dir / "metrics.parquet")
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    final, initial = summary.get("final_metrics") or {}, summary.get("initial_metrics") or {}
    return {"steps": cfg.steps, "eval_every": cfg.eval_every, "curve": curve, "error": error,
            "run_seconds": round(seconds, 3),
            "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "final": {"accuracy": final.get("eval_accuracy"), "loss": json_number(final.get("eval_loss")),
                      "initial_accuracy": initial.get("eval_accuracy"),
                      "forward_passes": summary.get("forward_passes"),
                      "wall_seconds": summary.get("wall_seconds"), "steps_completed": summary.get("steps_completed")}}


def read_curve(path: Path) -> list[list[float | None]]:
    """[step, forward passes, wall seconds, accuracy] of every evaluation in a metrics.parquet ([] if absent)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError):  # a run stopped before its first flush
        return []
    return [[r["step"], r["forward_passes"], round(float(r["wall_seconds"] or 0.0), 3),
             json_number(r.get("eval_accuracy"))]
            for r in sorted((r for r in rows if r["kind"] == "eval"), key=lambda r: r["step"])]
