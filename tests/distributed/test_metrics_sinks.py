"""Metrics beyond metrics.parquet: MLflow (a local file store) and Weights & Biases (offline), one key each;
a resumed run continues the same tracker run; a sink that cannot work is refused before anything is written."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed import metrics_sinks
from ray_s2p.distributed.driver import train


def run(path, steps=30, resume=False, **overrides):
    cfg = RunConfig.from_dict(smoke_dict(steps=steps, **overrides))
    return train(cfg, path, resume=resume, log=lambda m: None)


def test_mlflow_gets_every_train_and_eval_row_and_a_resume_continues_the_same_run(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional dependency (the tracking extra)")
    from mlflow.tracking import MlflowClient
    uri = f"file:{tmp_path}/mlruns"
    run_dir = tmp_path / "run"
    run(run_dir, steps=20, mlflow=uri)
    first_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    run(run_dir, steps=30, resume=True, mlflow=uri)
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == first_id
    client = MlflowClient(tracking_uri=uri)
    record = client.get_run(first_id)
    assert record.info.status == "FINISHED" and record.info.run_name == "run"
    assert record.data.params["optimizer.name"] == "vs2p" and record.data.params["optimizer.eta"] == "2.0"
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    evals = {r["step"]: r["eval_accuracy"] for r in rows if r["kind"] == "eval"}
    logged = {m.step: m.value for m in client.get_metric_history(first_id, "eval/accuracy")}
    assert logged == pytest.approx(evals) and sorted(logged) == [0, 10, 20, 30]
    losses = {m.step: m.value for m in client.get_metric_history(first_id, "train/loss")}
    assert sorted(losses) == list(range(1, 31))  # steps 1-20, then the resumed 21-30
    assert losses[30] == pytest.approx(next(r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 30))
    assert mlflow.__version__  # the store was read through the library, not by parsing its files


def test_wandb_offline_writes_a_local_run_that_a_resume_reuses(tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional dependency (the tracking extra)")
    run_dir = tmp_path / "run"
    run(run_dir, steps=10, wandb="offline")
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"]
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    assert b"train/loss" in data and b"eval/accuracy" in data and b"optimizer" in data
    run(run_dir, steps=15, resume=True, wandb="offline")
    assert json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"] == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2


def test_sinks_that_cannot_work_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="wandb.*got 'yes'.*offline"):
        RunConfig.from_dict(smoke_dict(wandb="yes"))
    with pytest.raises(ConfigError, match="wandb: W&B keeps its run files in a local directory"):
        run(f"file://{tmp_path}/uri_run", wandb="offline")
    assert not (tmp_path / "uri_run").exists()
    real = metrics_sinks.importlib.util.find_spec
    monkeypatch.setattr(metrics_sinks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow: the mlflow package is not installed. Fix: pip install "
                                          r"'ray_s2p\[tracking\]'"):
        run(tmp_path / "missing", mlflow=f"file:{tmp_path}/mlruns")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "mlruns").exists()


def test_flat_config_names_every_key_by_its_dotted_path():
    flat = metrics_sinks.flat_config(RunConfig.from_dict(smoke_dict()))
    assert flat["optimizer.eta"] == 2.0 and flat["cluster.replicas"] == 2 and flat["seed"] == 3
    assert not any(isinstance(v, dict) for v in flat.values())
