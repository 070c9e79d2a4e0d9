"""The run directory: config.yaml, ledger.parquet, metrics.parquet, summary.json, checkpoints/, final/.

Every file is written atomically, on a local path, a URI or a given pyarrow FileSystem (storage_fs.py).
See docs/ledger.md for the layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa
import yaml

from ..config import ConfigError, RunConfig
from ..config_history import saved_config
from ..errors import RayS2PError
from ..storage_fs import (
    Location,
    StoragePath,
    location,
    read_parquet,
    remove_tree,
    write_json,
    write_parquet,
    write_yaml,
)
from ..tasks import unused_keys
from .metrics_sinks import MetricsSink, check_sinks, open_sinks

if TYPE_CHECKING:
    from ..zo.ledger import LedgerRow

METRIC_COLUMNS = ["step", "kind", "loss", "eval_loss", "eval_accuracy", "eval_macro_f1", "forward_passes",
                  "wall_seconds", "bytes_sent", "bytes_received", "skipped_directions", "eval_split", "replicas"]


def written_config(config: RunConfig) -> dict[str, Any]:
    """What a run's config.yaml holds: ``config.to_dict()`` without the task keys its task never reads
    (tasks.unused_keys: the synthetic task names no model or dataset). Loading it back gives ``config``
    again (left-out keys take their defaults, which that task ignores), so fingerprints are unchanged."""
    data = config.to_dict()
    for key in unused_keys(config.task):
        del data["task"][key]
    return data


class RunDirectoryError(RayS2PError, ValueError):
    """The output directory cannot be used as asked."""


class RunDirectory:
    """Owns the files of one run."""

    def __init__(self, path: str | Path | StoragePath, config: RunConfig, *, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.path: Location = location(path)
        self.config = config
        self.resumed = resume
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{'--resume' if resume else 'output directory'} {str(self.path)!r} is a file, "
                                    f"not a run directory. Fix: choose another --output (a new or run directory)")
        self.created = not self.path.exists()  # a failed start removes only a directory it created
        existing = (self.path / "config.yaml").exists()
        check_sinks(config, self.path)  # tensorboard, mlflow, wandb: refused before anything is written
        if resume and not existing:
            raise RunDirectoryError(f"--resume: {str(self.path)!r} holds no run (no config.yaml). "
                                    f"Fix: point --resume at an existing run directory")
        if existing and not resume:
            if not overwrite:
                raise RunDirectoryError(f"output directory {str(self.path)!r} already holds a run. "
                                        f"Fix: pass --resume to continue it, --overwrite to replace it, "
                                        f"or choose another --output")
            for name in ("config.yaml", "ledger.parquet", "metrics.parquet", "summary.json"):
                (self.path / name).unlink(missing_ok=True)
            for name in ("checkpoints", "final"):
                remove_tree(self.path / name)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_yaml(self.path / "config.yaml", written_config(config))
        # A resume writes nothing until the driver has verified the checkpoint and ledger (``confirm_resume``):
        # a refused resume must leave the run directory byte-identical.
        self.checkpoints = self.path / "checkpoints"
        self.ledger_path = self.path / "ledger.parquet"
        self.metrics_path = self.path / "metrics.parquet"
        self.rows: list[dict[str, Any]] = []
        self.metrics_problem: str | None = None  # why metrics.parquet could not be read on resume
        if resume and self.metrics_path.exists():
            try:
                self.rows = read_parquet(self.metrics_path).to_pylist()
            except Exception as exc:  # pyarrow raises several types; the driver rebuilds from the ledger
                self.metrics_problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.resyncs = 0
        self.sinks: list[MetricsSink] = []

    def open_sinks(self, log: Callable[[str], None]) -> None:
        """Open TensorBoard, MLflow and W&B as configured (metrics_sinks.py): once the replicas are up and, on a
        resume, the checkpoint and ledger verified, so a failed start leaves no tracker run behind."""
        self.sinks = open_sinks(self.config, self.path, log)

    def close_sinks(self, status: str) -> None:
        """End every sink's record (``FINISHED`` or ``FAILED``); a second call does nothing."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(status)

    def confirm_resume(self) -> None:
        """The resume has been verified: record its overrides (e.g. ``cluster.replicas``) in config.yaml, so a
        later plain ``--resume`` continues with them."""
        data = written_config(self.config)
        file = self.path / "config.yaml"
        if yaml.safe_load(file.read_text()) != data:
            write_yaml(file, data)

    @staticmethod
    def load_config(path: str | Path | StoragePath) -> RunConfig:
        """The resolved config saved in a run directory (a local path, a URI or a location of storage_fs.py)."""
        file = location(path) / "config.yaml"
        if not file.is_file():
            raise ConfigError(f"{str(path)!r} holds no run (config.yaml missing). Fix: point at a run directory")
        return saved_config(yaml.safe_load(file.read_text()))

    # -------------------------------------------------------------- metrics
    def rebuild_train_rows(self, ledger: "Sequence[LedgerRow]", shards: int, upto: int, ckpt_meta: dict[str, Any],
                           passes_per_step: int | None = None) -> str:
        """Train rows of steps 1..``upto`` from the ledger, for a resume whose metrics.parquet is torn.

        The ledger is the truth for steps, losses and forward passes: a step's loss is the mean of its finite
        two-point losses (as the driver computes it) and its forward passes are every loss value of every
        direction times the data shards that each computed it. The wall time so far comes from the checkpoint
        (``ckpt_meta``); byte counts and evaluations after step 0 are lost. First-order runs have no ledger
        rows: ``passes_per_step`` gives their count.

        Returns:
            The one line to log about it.
        """
        by_step: dict[int, list[LedgerRow]] = {}
        for row in ledger:
            if row.step <= upto:
                by_step.setdefault(row.step, []).append(row)
        passes = 0
        self.rows = []
        for step in range(1, upto + 1):
            values = [([r.loss_plus, r.loss_minus] if r.radius is not None else []) + list(r.extra_losses or ())
                      for r in by_step.get(step, [])]
            rows = by_step.get(step, [])  # a row's own shards where recorded (a replica range may have changed them)
            passes += (sum(len(v) * (r.shards or shards) for v, r in zip(values, rows)) if values
                       else (passes_per_step or 0))
            finite = [x for v in values for x in v[:2] if x is not None and math.isfinite(x)]
            skipped = sum(1 for v in values if not all(x is not None and math.isfinite(x) for x in v))
            self.rows.append(self._row(step=step, kind="train", loss=sum(finite) / len(finite) if finite else None,
                                       forward_passes=passes, skipped_directions=skipped))
        wall = float(ckpt_meta.get("wall_seconds") or 0.0)
        if self.rows:
            self.rows[-1]["wall_seconds"] = wall  # where previous_wall_seconds() picks it up
        return (f"metrics.parquet is unreadable ({self.metrics_problem}); rebuilt the train rows of steps 1-{upto} "
                f"from the ledger ({passes} forward passes) and the wall time from the checkpoint ({wall:.1f} s); "
                f"their byte counts and the evaluations between step 0 and {upto} are lost")

    def truncate_metrics(self, step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= step]

    def previous_wall_seconds(self) -> float:
        return max((r["wall_seconds"] or 0.0 for r in self.rows), default=0.0)

    def previous_forward_passes(self, step: int) -> int:
        return int(max((r["forward_passes"] or 0 for r in self.rows if r["step"] <= step), default=0))

    def initial_eval(self) -> dict[str, float] | None:
        for r in self.rows:
            if r["kind"] == "eval" and r["step"] == 0:
                return {k: r[k] for k in ("eval_loss", "eval_accuracy", "eval_macro_f1") if r.get(k) is not None}
        return None

    def _row(self, **values: Any) -> dict[str, Any]:
        row = {c: None for c in METRIC_COLUMNS}
        row.update(values)
        return row

    def record_step(self, step: int, loss: float, passes: int, wall: float, sent: int, recv: int, skipped: int,
                    replicas: int | None = None) -> None:
        """A train row; ``replicas``: how many replicas the step ran on (a replica range can lose some)."""
        self.rows.append(self._row(step=step, kind="train", loss=loss, forward_passes=passes, wall_seconds=wall,
                                   bytes_sent=sent, bytes_received=recv, skipped_directions=skipped,
                                   replicas=replicas))
        if math.isfinite(loss):
            values = {"train/loss": loss, "train/forward_passes": passes}
            if replicas is not None:
                values["train/replicas"] = replicas
            for sink in self.sinks:
                sink.scalars(step, values)

    def record_eval(self, step: int, metrics: dict[str, float], passes: int, wall: float) -> None:
        # eval_split says which held-out split (validation or test) the numbers come from.
        row = self._row(step=step, kind="eval", forward_passes=passes, wall_seconds=wall,
                        eval_split=self.config.task.eval_split, **metrics)
        # The step-0 evaluation of a resume with rebuilt metrics goes before the rebuilt train rows.
        self.rows.insert(0, row) if step == 0 else self.rows.append(row)
        values = {f"eval/{key.removeprefix('eval_')}": value for key, value in metrics.items()}
        for sink in self.sinks:
            sink.scalars(step, values)

    def report_row(self, step: int) -> dict[str, Any]:
        """Latest train loss and eval metrics, for Tune reports."""
        out: dict[str, Any] = {"step": step}
        for r in self.rows:
            if r["kind"] == "train" and r["step"] <= step:
                out["loss"] = r["loss"]
                out["forward_passes"] = r["forward_passes"]
            if r["kind"] == "eval" and r["step"] <= step:
                out.update({k: r[k] for k in ("eval_loss", "eval_accuracy", "eval_macro_f1") if r[k] is not None})
        return out

    def flush_metrics(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=pa.schema([
            ("step", pa.int64()), ("kind", pa.string()), ("loss", pa.float64()), ("eval_loss", pa.float64()),
            ("eval_accuracy", pa.float64()), ("eval_macro_f1", pa.float64()), ("forward_passes", pa.int64()),
            ("wall_seconds", pa.float64()), ("bytes_sent", pa.int64()), ("bytes_received", pa.int64()),
            ("skipped_directions", pa.int64()), ("eval_split", pa.string()), ("replicas", pa.int64())]))
        write_parquet(self.metrics_path, table)
        for sink in self.sinks:
            sink.flush()

    def discard(self) -> None:
        """Remove the run directory if this run created it and never trained a step (failed start)."""
        if self.created and self.path.exists():
            remove_tree(self.path)

    def count_resync(self) -> None:
        self.resyncs += 1

    # -------------------------------------------------------------- outputs
    def write_summary(self, **fields: Any) -> dict[str, Any]:
        fields["replica_resyncs"] = self.resyncs
        fields["run_dir"] = str(self.path)
        write_json(self.path / "summary.json", fields)
        self.close_sinks("FINISHED")
        return fields
