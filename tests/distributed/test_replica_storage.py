"""Checkpoints and final/ are written by replica 0 into the run directory; the driver moves no tensors.

The driver sends the step, the path and a few scalars and gets back digests, checksums and
file sizes; resume, recovery and resync load the checkpoint in the replicas. A replica that
cannot reach the run directory stops the run before step 1.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.checkpoint import list_checkpoints
from ray_s2p.distributed.driver import Driver, train
from ray_s2p.distributed.engine import ReplicaEngine
from ray_s2p.distributed.replica import LocalPool
from ray_s2p.distributed.storage import StorageError, probe_storage

TENSOR_CALLS = {"trainable_state", "load_trainable", "export_final"}  # the calls that used to carry tensors


def has_tensor(obj: Any) -> bool:
    if torch.is_tensor(obj):
        return True
    if isinstance(obj, dict):
        return any(has_tensor(k) or has_tensor(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(has_tensor(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return any(has_tensor(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return False


class RecordingPool(LocalPool):
    """A LocalPool that keeps every (method, args, results) the driver exchanged with its replicas."""

    calls: list[tuple[str, list, list]] = []

    def call(self, method, args, replicas=None, timeout=None):
        results = super().call(method, args, replicas, timeout)
        RecordingPool.calls.append((method, list(args), list(results)))
        return results


def test_a_checkpoint_moves_no_tensors_through_the_driver(tmp_path):
    RecordingPool.calls = []
    cfg = RunConfig.from_dict(smoke_dict(**{"steps": 20, "checkpoint_every": 5}))
    result = train(cfg, tmp_path / "run", log=lambda m: None, pool=RecordingPool)
    calls = RecordingPool.calls
    saves = [(a, r) for m, a, r in calls if m == "save_checkpoint"]
    assert [a[0][0] for a, _ in saves] == [5, 10, 15, 20]  # one replica (0) writes, once per checkpoint
    for method, args, results in calls:
        assert method not in TENSOR_CALLS
        assert not has_tensor(args) and not has_tensor(results), method
        assert len(pickle.dumps((args, results))) < 4096, method
    # What replica 0 reported is what is on disk (the 2 newest are kept): sha256 and size, parameter digest.
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000015", "step_00000020"]
    for _, (record,) in saves[-2:]:
        state = json.loads((Path(record.path) / "state.json").read_text())
        assert state["params_sha256"] == record.params_sha256 and state["digest"] == record.digest
        assert (Path(record.path) / "params.safetensors").stat().st_size == record.params_bytes
    assert state["digest"] == result.final_digest
    traffic = result.summary["traffic"]
    assert traffic["largest_message"]["bytes"] < 4096 and "save_checkpoint" in traffic["per_method"]
    assert "write_final" in traffic["per_method"] and not TENSOR_CALLS & set(traffic["per_method"])
    assert not hasattr(ReplicaEngine, "trainable_state")
    run_dir = tmp_path / "run"
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert not [p.name for p in run_dir.rglob(".*")]  # no staging or probe files left behind


def test_resume_and_resync_load_the_checkpoint_in_the_replicas(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict())
    full = train(cfg, tmp_path / "full", log=lambda m: None)
    train(RunConfig.from_dict(smoke_dict(steps=20)), tmp_path / "part", log=lambda m: None)
    RecordingPool.calls = []
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda m: None, pool=RecordingPool)
    assert resumed.final_digest == full.final_digest
    loads = [a for m, a, _ in RecordingPool.calls if m == "load_checkpoint"]
    assert len(loads) == 1 and [Path(p).name for p, _ in loads[0]] == ["step_00000020"] * 2  # paths, not tensors


def test_a_replica_that_cannot_reach_the_run_directory_stops_the_run_before_step_1(tmp_path, monkeypatch):
    # Replica 1 sees another directory at the run directory's path, as on a node without the shared mount.
    other = tmp_path / "other-node"

    def elsewhere(self, run_dir, token):
        return probe_storage(other / Path(run_dir).name if self.replica == 1 else run_dir, token, self.replica)

    def no_step(self, request):
        raise AssertionError("a step ran although the storage check failed")

    monkeypatch.setattr(ReplicaEngine, "check_storage", elsewhere)
    monkeypatch.setattr(ReplicaEngine, "probe", no_step)
    cfg = RunConfig.from_dict(smoke_dict())
    with pytest.raises(StorageError) as info:
        train(cfg, tmp_path / "run", log=lambda m: None)
    message = str(info.value)
    assert "replica 1" in message and "--output" in message and "shared filesystem" in message
    assert not (tmp_path / "run").exists()  # a fresh run leaves nothing
    assert not other.exists() or not any(other.rglob("*"))


def test_unreachable_storage_on_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(RunConfig.from_dict(smoke_dict(steps=20)), run_dir, log=lambda m: None)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(ReplicaEngine, "check_storage",
                        lambda self, run_dir, token: probe_storage(tmp_path / "elsewhere", token, self.replica))
    with pytest.raises(StorageError, match="not reachable from every replica"):
        train(RunConfig.from_dict(smoke_dict(steps=20)), run_dir, resume=True, log=lambda m: None)
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # config.yaml is rewritten with the same content; nothing else is touched


def test_storage_check_passes_on_one_node_and_cleans_up(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict())
    tmp_path.joinpath("run").mkdir()
    from ray_s2p.distributed.storage import check_storage
    answers = check_storage(LocalPool(cfg), tmp_path / "run")
    assert [a["replica"] for a in answers] == [0, 1] and all(a["error"] is None for a in answers)
    assert list((tmp_path / "run").iterdir()) == []


def test_final_export_writes_in_place_and_replaces_an_old_final(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict(steps=4, checkpoint_every=2))
    engine = ReplicaEngine(cfg)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("old")
    files = engine.write_final(str(tmp_path))
    assert files == {"model.safetensors": (tmp_path / "final" / "model.safetensors").stat().st_size}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # staged beside it, renamed into place
    driver = Driver(cfg, tmp_path / "run", log=lambda m: None)
    driver.run()
    assert len(list_checkpoints(tmp_path / "run" / "checkpoints")) == 2


def test_replica_0_dying_while_it_writes_a_checkpoint_is_replaced_and_writes_again(tmp_path):
    from ray_s2p.distributed.replica import ReplicaFailure

    class DiesOnceWhileSaving(LocalPool):
        fired: list[int] = []

        def call(self, method, args, replicas=None, timeout=None):
            if method == "save_checkpoint" and args[0][0] == 10 and not self.fired:
                self.fired.append(10)
                raise ReplicaFailure([0], [None], "replica 0 died (ActorDiedError)")
            return super().call(method, args, replicas, timeout)

    cfg = RunConfig.from_dict(smoke_dict())
    reference = train(cfg, tmp_path / "reference", log=lambda m: None)
    result = train(cfg, tmp_path / "run", log=lambda m: None, pool=DiesOnceWhileSaving)
    assert DiesOnceWhileSaving.fired == [10] and result.summary["replica_failures"] == 1
    assert result.final_digest == reference.final_digest
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000030" / "state.json").read_text())
    assert state["digest"] == reference.final_digest
