"""Where a run's metrics go besides metrics.parquet: TensorBoard, MLflow and Weights & Biases, each off by default
and switched on by one config key (``tensorboard``, ``mlflow``, ``wandb``; docs/config.md).

The driver alone writes them (replicas send scalars only), through each library's own API: TensorBoard's
``SummaryWriter``, MLflow's ``MlflowClient`` (any tracking URI; a local ``file:`` store works offline) and
``wandb`` (``offline`` writes a local run that ``wandb sync`` uploads later). A resumed run continues the same
MLflow run and W&B run: their ids are kept in the run directory's ``tracking.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

from ..config import ConfigError, RunConfig
from ..storage_fs import Location, StoragePath, write_json

TRACKING_FILE = "tracking.json"
MLFLOW_EXPERIMENT = "ray_s2p"
WANDB_PROJECT = "ray_s2p"


class MetricsSink(Protocol):
    """One destination of a run's scalars."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (name -> number, names like ``train/loss``) at ``step``."""

    def flush(self) -> None:
        """Make what was recorded durable (called with every metrics.parquet write)."""

    def close(self, status: str) -> None:
        """End the run's record: ``FINISHED`` or ``FAILED``."""


def flat_config(config: RunConfig) -> dict[str, Any]:
    """The config as dotted keys (``optimizer.eta``), for the trackers' run parameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = node
    walk("", config.to_dict())
    return out


def check_sinks(config: RunConfig, path: Location) -> None:
    """Refuse, before anything is written, a sink that cannot work here: its library is missing, or it needs a
    local directory and the run directory is a URI.

    Raises:
        ConfigError: naming the key and the fix.
    """
    local = not isinstance(path, StoragePath)
    if config.tensorboard and not local:
        raise ConfigError(f"tensorboard: event files are written on a local path only, and the run directory is "
                          f"{str(path)!r}. Fix: --set tensorboard=false, or a local --output")
    if config.wandb and not local:
        raise ConfigError(f"wandb: W&B keeps its run files in a local directory, and the run directory is "
                          f"{str(path)!r}. Fix: --set wandb='' or a local --output")
    for key, module, extra in (("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb")):
        if getattr(config, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}: the {module} package is not installed. Fix: pip install "
                              f"'ray_s2p[tracking]' (or pip install {extra}), or --set {key}=''")


class TensorBoardSink:
    """Event files under ``RUN_DIR/tensorboard``."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(directory))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run per training run (experiment ``ray_s2p``, run name = the run directory's name)."""

    def __init__(self, uri: str, run_name: str, params: dict[str, Any], run_id: str | None) -> None:
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless asked for it; a file store is what this key asks for.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id if run_id and self._exists(run_id) else None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(MLFLOW_EXPERIMENT)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            from mlflow.entities import Param
            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[start:start + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.pending: list[Any] = []

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MLflow raises its own error types for a run it does not know
            return False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.pending.extend(Metric(name, float(value), now, step) for name, value in values.items())

    def flush(self) -> None:
        while self.pending:  # MLflow takes at most 1000 metrics per batch
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


class WandbSink:
    """One W&B run per training run, in ``RUN_DIR/wandb``; ``mode`` offline or online."""

    def __init__(self, directory: Path, mode: str, run_name: str, params: dict[str, Any], run_id: str) -> None:
        import wandb
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=WANDB_PROJECT, name=run_name, dir=str(directory), mode=mode, id=run_id,
                              resume="allow", config=params, settings=wandb.Settings(silent=True))
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def flush(self) -> None:
        """W&B writes as it goes."""

    def close(self, status: str) -> None:
        import wandb
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        # finish() only tells W&B's service process that the run ended; the service writes the rest of the
        # run file afterwards, so a caller (wandb sync, a Tune trial, a test) could read a truncated file.
        # Tearing the service down waits for it, and is only done when no other W&B run of this process is
        # open; the next wandb.init starts a fresh service.
        if wandb.run is None:
            wandb.teardown()


def open_sinks(config: RunConfig, path: Location, log: Callable[[str], None]) -> list[MetricsSink]:
    """The sinks ``config`` asks for, on the run directory ``path`` (fresh or resumed).

    A resumed run reopens its MLflow and W&B runs from ``tracking.json``; a missing TensorBoard package is one
    line and no event files (as before the other sinks existed).
    """
    sinks: list[MetricsSink] = []
    if config.tensorboard:
        try:
            sinks.append(TensorBoardSink(Path(str(path)) / "tensorboard"))
        except ImportError:
            log("tensorboard is not installed; skipping event files (pip install tensorboard)")
    if not (config.mlflow or config.wandb):
        return sinks
    file = path / TRACKING_FILE
    ids: dict[str, Any] = json.loads(file.read_text()) if file.exists() else {}
    name = Path(str(path)).name
    params = flat_config(config)
    if config.mlflow:
        sink = MLflowSink(config.mlflow, name, params, ids.get("mlflow_run_id"))
        if ids.get("mlflow_run_id") not in (None, sink.run_id):
            log(f"mlflow: run {ids['mlflow_run_id']} is not at {config.mlflow}; this run continues as {sink.run_id}")
        ids["mlflow_run_id"] = sink.run_id
        sinks.append(sink)
    if config.wandb:
        ids.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        sinks.append(WandbSink(Path(str(path)), config.wandb, name, params, ids["wandb_run_id"]))
    write_json(file, ids)
    return sinks
