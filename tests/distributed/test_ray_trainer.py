"""The trainer on a real local Ray: identical replicas, replica faults healed to the undisturbed digest."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.driver import Driver, TrainingError, train


def fault_config(tmp_path: Path, kind: str, at_step: int = 12, replica: int = 1, **overrides) -> RunConfig:
    marker = tmp_path / "markers"
    marker.mkdir(exist_ok=True)
    data = smoke_dict(**{"task.name": "fault_tasks:build", "cluster.use_ray": True,
                         "task.options": {"marker_dir": str(marker), "at_step": at_step, "replica": replica,
                                          "kind": kind}}, **overrides)
    return RunConfig.from_dict(data)


def undisturbed_digest(tmp_path: Path, cfg: RunConfig) -> str:
    local = cfg.replace({"cluster.use_ray": False, "task.options.kind": "none"})
    return train(local, tmp_path / "reference", log=lambda m: None).final_digest


def assert_every_step_once(run_dir: Path, steps: int, directions: int) -> None:
    rows = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    keys = [(r["step"], r["direction"]) for r in rows]
    assert len(keys) == len(set(keys)) == steps * directions
    assert sorted({r["step"] for r in rows}) == list(range(1, steps + 1))


def assert_no_tensor_traffic(traffic: dict) -> None:
    """Replica 0 writes checkpoints and final/ itself: the driver's largest message is a few hundred bytes."""
    assert {"save_checkpoint", "write_final", "check_storage"} <= set(traffic["per_method"])
    assert not {"trainable_state", "load_trainable", "export_final"} & set(traffic["per_method"])
    assert traffic["largest_message"]["bytes"] < 4096, traffic["largest_message"]


def test_ray_replicas_equal_in_process_run(tmp_path, ray_session):
    cfg = fault_config(tmp_path, "none", **{"cluster.digest_every": 1})
    result = train(cfg, tmp_path / "ray", log=lambda m: None)
    assert result.final_digest == undisturbed_digest(tmp_path, cfg)
    assert result.summary["replica_resyncs"] == 0
    assert_no_tensor_traffic(result.summary["traffic"])


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank"])
def test_sigkill_of_a_replica_process_mid_step_is_healed(tmp_path, ray_session, distribution):
    cfg = fault_config(tmp_path, "die", at_step=12, **{"perturbation.distribution": distribution})
    messages: list[str] = []
    result = train(cfg, tmp_path / "run", log=messages.append)
    assert result.summary["replica_failures"] == 1, messages
    assert (tmp_path / "markers" / "fired-die").exists()
    assert result.final_digest == undisturbed_digest(tmp_path, cfg)
    assert result.summary["traffic"]["per_method"]["load_checkpoint"]["calls"] == 1  # the new replica read step 10
    assert_no_tensor_traffic(result.summary["traffic"])
    assert_every_step_once(tmp_path / "run", cfg.steps, 2)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_external_sigkill_of_replica_worker_is_healed(tmp_path, ray_session, signum):
    """SIGKILL: a crashed machine. SIGTERM: the notice a preempted (spot) node's processes get; the worker exits
    at once and its step is abandoned, then healed as any lost replica (the phase is redone, nothing half-written
    is kept: checkpoints are staged and renamed)."""
    cfg = fault_config(tmp_path, "none", **{"steps": 40})
    killed: list[int] = []

    def report(metrics, checkpoint):
        if metrics["step"] == 15 and not killed:
            pid = driver.pool.pids()[0]  # the worker process of replica 0
            os.kill(pid, signum)
            killed.append(pid)

    driver = Driver(cfg, tmp_path / "run", report=report, log=lambda m: None)
    result = driver.run()
    assert killed and result.summary["replica_failures"] == 1
    assert result.final_digest == undisturbed_digest(tmp_path, cfg)
    assert_every_step_once(tmp_path / "run", cfg.steps, 2)


def test_hung_replica_is_treated_as_dead(tmp_path, ray_session):
    cfg = fault_config(tmp_path, "hang", at_step=8, **{"cluster.step_timeout_s": 5})
    result = train(cfg, tmp_path / "run", log=lambda m: None)
    assert result.summary["replica_failures"] == 1
    assert result.final_digest == undisturbed_digest(tmp_path, cfg)


def test_corrupted_replica_is_caught_and_resynced(tmp_path, ray_session):
    # Replica 1's parameters change while it evaluates after the last step, when no probe is left to use
    # them: the final digest check must find it, rebuild the replica, and the run end undisturbed.
    cfg = fault_config(tmp_path, "corrupt_at_eval", at_step=30, **{"cluster.on_mismatch": "resync"})
    messages: list[str] = []
    result = train(cfg, tmp_path / "run", log=messages.append)
    assert (tmp_path / "markers" / "fired-corrupt_at_eval").exists()
    assert result.summary["replica_resyncs"] == 1
    assert any("digests differ" in m for m in messages)
    assert result.final_digest == undisturbed_digest(tmp_path, cfg)  # the resynced replica rejoined exactly


def test_corrupted_replica_aborts_under_abort_policy(tmp_path, ray_session):
    cfg = fault_config(tmp_path, "corrupt", at_step=7, **{"cluster.digest_every": 1, "cluster.on_mismatch": "abort"})
    with pytest.raises(TrainingError, match="replica digests differ"):
        train(cfg, tmp_path / "run", log=lambda m: None)


def test_more_cpus_than_the_cluster_has_fails_fast(tmp_path, ray_session):
    cfg = fault_config(tmp_path, "none", **{"cluster.cpus_per_replica": 8})
    with pytest.raises(RuntimeError, match="cluster.replicas=2 x CPU=8"):
        train(cfg, tmp_path / "run", log=lambda m: None)
    # A replica range needs only its minimum placed to start: that is what is checked, and named.
    cfg = fault_config(tmp_path, "none", **{"cluster.cpus_per_replica": 1.5, "cluster.replicas": 3,
                                            "cluster.min_replicas": 2})
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cluster.min_replicas=2 x CPU=1.5 per replica needs 3 CPU, but the "
                                           r"cluster has 2. Fix: lower cluster.min_replicas"):
        train(cfg, tmp_path / "run2", log=lambda m: None)
    assert time.monotonic() - started < cfg.cluster.startup_timeout_s / 2  # refused, not waited out


@pytest.mark.slow
def test_removed_node_is_healed(tmp_path):
    """A whole node leaves mid-run: a ray.cluster_utils.Cluster of a head and two worker nodes on this machine,
    the replicas placed STRICT_SPREAD (never two on one node); the node of one replica is removed at step 12,
    its bundle moves to the spare node, the replica is rebuilt there and the run ends at the undisturbed digest."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 100 * 1024 * 1024})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = fault_config(tmp_path, "none", **{"steps": 30, "cluster.placement_strategy": "STRICT_SPREAD",
                                                "cluster.step_timeout_s": 60})
        removed: list[str] = []
        placed: dict[int, list[str]] = {}

        def report(metrics, checkpoint):
            if metrics["step"] in (10, 25):
                placed[metrics["step"]] = driver.pool.node_ids()
            if metrics["step"] == 10 and not removed:
                victim = next(n for n in nodes if n.node_id in placed[10])  # a worker node holding a replica
                removed.append(victim.node_id)
                threading.Thread(target=cluster.remove_node, args=(victim,)).start()

        driver = Driver(cfg, tmp_path / "run", report=report, log=lambda m: None)
        result = driver.run()
        assert removed and result.summary["replica_failures"] >= 1
        assert len(set(placed[10])) == 2 and len(set(placed[25])) == 2  # spread before and after
        assert removed[0] in placed[10] and removed[0] not in placed[25]  # the lost replica lives elsewhere now
        assert result.final_digest == undisturbed_digest(tmp_path, cfg)
        assert_every_step_once(tmp_path / "run", cfg.steps, 2)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_repeated_random_sigkills_during_one_run(tmp_path, ray_session):
    """Chaos: three SIGKILLs of random replicas at random steps; the run still ends bit-identical."""
    import random

    cfg = fault_config(tmp_path, "none", **{"steps": 60, "log_every": 1, "checkpoint_every": 15})
    rng = random.Random(7)
    kill_steps = set(rng.sample(range(5, 55), 3))
    killed: list[tuple[int, int]] = []

    def report(metrics, checkpoint):
        if metrics["step"] in kill_steps and len(killed) < len(kill_steps):
            victim = rng.randrange(2)
            os.kill(driver.pool.pids()[victim], signal.SIGKILL)
            killed.append((metrics["step"], victim))

    driver = Driver(cfg, tmp_path / "run", report=report, log=lambda m: None)
    result = driver.run()
    assert len(killed) == 3 and result.summary["replica_failures"] == 3
    assert result.final_digest == undisturbed_digest(tmp_path, cfg)
    assert_every_step_once(tmp_path / "run", cfg.steps, 2)


def test_too_many_replica_failures_stop_the_run(tmp_path, ray_session):
    cfg = fault_config(tmp_path, "die", at_step=5, **{"cluster.max_replica_failures": 0})
    with pytest.raises(TrainingError, match="exceed cluster.max_replica_failures=0"):
        train(cfg, tmp_path / "run", log=lambda m: None)


def test_a_first_order_replica_that_dies_stops_the_run_and_the_resume_finishes_it_exactly(ray_session, tmp_path):
    # A backprop replica keeps its steps only in itself: no ledger could catch a replacement up, so the run
    # stops, names the resume, and the resume from the newest checkpoint ends where an undisturbed run ends.
    cfg = fault_config(tmp_path, "die", at_step=13, replica=0, **{
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "cluster.replicas": 1, "steps": 20, "checkpoint_every": 5})
    with pytest.raises(TrainingError, match=r"'first_order_step' failed.*first-order reference \(sgd\) writes no "
                                            r"ledger.*newest checkpoint, step 10, with `ray-s2p train --resume"):
        train(cfg, tmp_path / "run", log=lambda m: None)
    resumed = train(cfg, tmp_path / "run", resume=True, log=lambda m: None)
    assert resumed.summary["steps_completed"] == 20
    assert resumed.final_digest == undisturbed_digest(tmp_path, cfg)
