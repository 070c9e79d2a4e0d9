"""Run directories at a URI or in a given pyarrow FileSystem: train, resume, replay and eval, with the
replicas writing and loading checkpoints there themselves and checking before step 1 that they reach it.

file:// URIs and a SubTreeFileSystem over a local directory stand in for cloud storage; with
``atomic="put"`` the SubTreeFileSystem is written as an object store is (one put per file, no rename).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.engine import ReplicaEngine
from ray_s2p.distributed.storage import StorageError, probe_storage
from ray_s2p.storage_fs import StoragePath
from ray_s2p.zo.ledger import read_environment

CLI = [sys.executable, "-m", "ray_s2p"]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def as_if_the_driver_died_after_step_20(run_dir: Path) -> None:
    """What a driver killed between the checkpoints of steps 20 and 30 leaves (the ledger may run ahead)."""
    shutil.rmtree(run_dir / "checkpoints" / "step_00000030")
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()


def object_store(root: Path) -> StoragePath:
    """runs/a in a SubTreeFileSystem over ``root``, written as an object store is (a put per file)."""
    root.mkdir(parents=True, exist_ok=True)
    return StoragePath(pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), "runs/a", None, "put")


def test_a_run_at_a_file_uri_trains_resumes_replays_and_evaluates_through_the_cli(tmp_path):
    data = smoke_dict()
    cfg_file = tmp_path / "smoke.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    reference = train(RunConfig.from_dict(data), tmp_path / "reference", log=lambda m: None)
    run_dir, uri = tmp_path / "bucket" / "run", f"file://{tmp_path}/bucket/run"

    done = subprocess.run(CLI + ["train", "--config", str(cfg_file), "--output", uri],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"outputs: {uri}" in done.stdout and f"final digest {reference.final_digest}" in done.stdout
    assert files_under(run_dir) == files_under(tmp_path / "reference") == [
        "checkpoints/step_00000020/params.safetensors", "checkpoints/step_00000020/state.json",
        "checkpoints/step_00000030/params.safetensors", "checkpoints/step_00000030/state.json",
        "config.yaml", "final/model.safetensors", "ledger.parquet", "metrics.parquet", "summary.json"]
    for name in ("checkpoints/step_00000020/params.safetensors", "final/model.safetensors"):
        assert (run_dir / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    # The ledgers hold the same rows; their environments differ at most in the torch thread count (the CLI's
    # process and this one may run different counts; it is recorded for replay, not part of the bits here).
    ledger, reference_ledger = run_dir / "ledger.parquet", tmp_path / "reference" / "ledger.parquet"
    assert pq.read_table(ledger).equals(pq.read_table(reference_ledger))
    environments = [{k: v for k, v in read_environment(p).items() if k != "threads"} for p in (ledger, reference_ledger)]
    assert environments[0] == environments[1]

    as_if_the_driver_died_after_step_20(run_dir)
    resumed = subprocess.run(CLI + ["train", "--resume", uri], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 20 and summary["final_digest"] == reference.final_digest
    assert summary["run_dir"] == uri
    keys = [(r["step"], r["direction"]) for r in pq.read_table(run_dir / "ledger.parquet").to_pylist()]
    assert len(keys) == len(set(keys)) == 30 * 2

    replay = subprocess.run(CLI + ["replay", uri, "--check"], capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert json.loads(replay.stdout)["match"] is True
    ev = subprocess.run(CLI + ["eval", uri, "--step", "20", "--storage", f"file://{tmp_path}/evals"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "evals" / "eval-step-20.json").read_text())["step"] == 20
    assert not [p.name for p in run_dir.rglob(".*")]  # no staging, temporary or probe files left behind


def test_on_an_object_store_a_checkpoint_without_state_json_is_incomplete_and_skipped(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict())
    reference = train(cfg, tmp_path / "reference", log=lambda m: None)
    store = object_store(tmp_path / "bucket")
    first = train(cfg, store, log=lambda m: None)
    run_dir = tmp_path / "bucket" / "runs" / "a"
    assert first.final_digest == reference.final_digest and str(first.run_dir) == "subtree:runs/a"
    assert files_under(run_dir) == files_under(tmp_path / "reference")  # no staging on an object store
    # A replica that died while it put the checkpoint of step 30: the tensors are there, state.json is not.
    (run_dir / "checkpoints" / "step_00000030" / "state.json").unlink()
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    lines: list[str] = []
    resumed = train(cfg, store, resume=True, log=lines.append)
    assert resumed.final_digest == reference.final_digest and resumed.summary["resumed_from"] == 20
    assert any("checkpoint fallback" in line and "incomplete" in line for line in lines), lines


def test_a_replica_that_cannot_reach_the_uri_stops_the_run_before_step_1(tmp_path, monkeypatch):
    other = f"file://{tmp_path}/other-credentials/run"  # what replica 1 resolves the URI to on its node

    def elsewhere(self, run_dir, token):
        return probe_storage(other if self.replica == 1 else run_dir, token, self.replica)

    monkeypatch.setattr(ReplicaEngine, "check_storage", elsewhere)
    with pytest.raises(StorageError) as info:
        train(RunConfig.from_dict(smoke_dict()), f"file://{tmp_path}/bucket/run", log=lambda m: None)
    assert "replica 1" in str(info.value) and "URI" in str(info.value)
    assert not (tmp_path / "bucket" / "run").exists()  # a fresh run leaves nothing


def test_tensorboard_at_a_uri_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="tensorboard"):
        train(RunConfig.from_dict(smoke_dict(tensorboard=True)), f"file://{tmp_path}/run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_ray_replicas_get_the_filesystem_object_and_write_and_load_checkpoints_there(tmp_path, ray_session):
    cfg = RunConfig.from_dict(smoke_dict(**{"cluster.use_ray": True}))
    reference = train(RunConfig.from_dict(smoke_dict()), tmp_path / "reference", log=lambda m: None)
    store = object_store(tmp_path / "bucket")
    first = train(cfg, store, log=lambda m: None)
    run_dir = tmp_path / "bucket" / "runs" / "a"
    assert first.final_digest == reference.final_digest
    assert first.summary["traffic"]["largest_message"]["bytes"] < 4096  # a path and scalars, never tensors
    as_if_the_driver_died_after_step_20(run_dir)
    resumed = train(cfg, store, resume=True, log=lambda m: None)  # every actor loads step 20 from the store
    assert resumed.final_digest == reference.final_digest and resumed.summary["resumed_from"] == 20
    assert files_under(run_dir) == files_under(tmp_path / "reference")
