"""What a comparison has finished, in one small file that can move to another machine.

``compare --resume`` can reuse a finished Tune sweep or seed run only while the output
directory that holds them is there. A full comparison on a small machine takes longer
than that directory may live (a day of CPU for every rule on MNIST), so ``compare`` also
keeps ``progress.json``: every finished sweep's trial rows and every finished rerun's
summary numbers and evaluation curve, a few kilobytes each, with no weights, ledgers or
checkpoints. Each entry is stored under a fingerprint of exactly what produced it (the
run config, the grid points, the budget); ``--resume`` takes an entry only when the
fingerprint of what it would run now is the same, so a changed config, grid or budget is
run again, never answered from an old result.

Copying ``progress.json`` to another machine (or naming it with ``compare --progress``)
continues the comparison there: the finished parts are not run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RayS2PError
from ..files import write_text
from .tune import error_line

FILE_NAME = "progress.json"
VERSION = 1
# What a rerun's entry keeps of its summary.json: enough for the tables, nothing model-sized.
SUMMARY_KEYS = ("final_metrics", "initial_metrics", "forward_passes", "wall_seconds", "steps_completed")


def fingerprint(payload: Any) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys, no spaces): equal inputs, equal fingerprints."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class NotRecorded(LookupError):
    """A sweep or run that ``train=False`` would have had to train: the progress file does not hold it."""


@dataclass
class CompareProgress:
    """The finished sweeps and runs of one comparison, saved atomically after every new entry.

    Attributes:
        path: the JSON file.
        sweeps: sweep label -> {"fingerprint", "metric", "mode", "rows"}.
        runs: run key (``VARIANT-seedS``) -> {"fingerprint", "summary", "curve"}.
    """

    path: Path
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> CompareProgress:
        """The progress in ``path``, or an empty one when the file does not exist yet.

        Raises:
            ValueError: the file is not a progress file of this version (nothing is overwritten).
        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RayS2PError(f"compare progress file {str(path)!r} is unreadable ({exc}). Fix: restore it from "
                             f"its copy, or move it away to run the comparison from the start") from exc
        if not isinstance(data, dict) or data.get("version") != VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise RayS2PError(f"compare progress file {str(path)!r} has version {found!r}, this version reads "
                             f"{VERSION}. Fix: move it away to run the comparison from the start")
        return cls(path, dict(data.get("sweeps", {})), dict(data.get("runs", {})))

    def sweep(self, label: str, key: str) -> dict[str, Any] | None:
        """The finished sweep ``label`` if it was made from inputs with fingerprint ``key``."""
        entry = self.sweeps.get(label)
        return entry if entry is not None and entry.get("fingerprint") == key else None

    def run(self, name: str, key: str) -> dict[str, Any] | None:
        """The finished run ``name`` if it was made from a config with fingerprint ``key``."""
        entry = self.runs.get(name)
        return entry if entry is not None and entry.get("fingerprint") == key else None

    def record_sweep(self, label: str, key: str, metric: str, mode: str, rows: list[dict[str, Any]]) -> None:
        """Keep a finished sweep, and save. A failed trial keeps its error's last line, the exception's message:
        Tune's error is a whole traceback, kilobytes long and naming the paths of the machine that ran it."""
        rows = [dict(row, error=error_line(row["error"])) if row.get("error") else row for row in rows]
        self.sweeps[label] = {"fingerprint": key, "metric": metric, "mode": mode, "rows": rows}
        self.save()

    def record_run(self, name: str, key: str, summary: dict[str, Any],
                   curve: list[tuple[float, float | None]]) -> None:
        """Keep a finished run's summary numbers and evaluation curve, and save."""
        self.runs[name] = {"fingerprint": key, "summary": {k: summary.get(k) for k in SUMMARY_KEYS},
                           "curve": [list(point) for point in curve]}
        self.save()

    def save(self) -> None:
        """Write the file atomically (a crash leaves the previous version)."""
        data = {"version": VERSION, "sweeps": self.sweeps, "runs": self.runs}
        write_text(self.path, json.dumps(data, indent=1, sort_keys=True, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    # numpy scalars from Tune's result rows; anything else JSON cannot hold is kept as its text
    return value.item() if hasattr(value, "item") else str(value)
