"""A replica range (cluster.min_replicas): a replica whose replacement cannot start is dropped and the run goes on
with the others (in data and hybrid mode with the step's batch cut among them), no step lost or repeated, exactly
as a run resumed with fewer replicas; below the minimum the run stops with a resumable run directory."""

from __future__ import annotations

import json
import random
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.driver import Driver, train
from ray_s2p.distributed.replay import replay_run
from ray_s2p.distributed.replica import LocalPool, ReplicaFailure
from ray_s2p.distributed.run_state import TrainingError

ELASTIC = {"cluster.min_replicas": 1, "cluster.replace_timeout_s": 5, "cluster.digest_every": 1}


class LosingPool(LocalPool):
    """Loses replica ``slot`` in the ``nth`` call of ``method``; no replacement can start (no capacity left)."""

    def __init__(self, config: RunConfig, method: str, nth: int, slots: tuple[int, ...]) -> None:
        super().__init__(config)
        self.method, self.nth, self.lose = method, nth, slots
        self.calls = 0
        self.replacements_tried = 0

    def call(self, method, args, replicas=None, timeout=None):
        idx = list(range(self.size)) if replicas is None else list(replicas)
        if method == self.method:
            self.calls += 1
            lost = [r for r in idx if self.slots[r] in self.lose]
            if self.calls == self.nth and lost:
                kept = [r for r in idx if r not in lost]
                answers = dict(zip(kept, super().call(method, [a for r, a in zip(idx, args) if r in kept], kept)))
                raise ReplicaFailure(lost, [answers.get(r) for r in idx], f"replicas {lost} died")
        return super().call(method, args, replicas, timeout)

    def replace(self, replica, timeout=None):
        self.replacements_tried += 1
        assert timeout == 5  # a replica range gives a replacement cluster.replace_timeout_s, not the start-up time
        raise ReplicaFailure([replica], [None], f"replica {self.slots[replica]}'s replacement found no free bundle")


def losing(method: str, nth: int, slots: tuple[int, ...] = (0,)):
    return lambda config: LosingPool(config, method, nth, slots)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """2 replicas for 10 steps, then resumed with 1 replica to step 30: what losing one after step 10 must give."""
    path = tmp_path_factory.mktemp("reference") / "run"
    train(RunConfig.from_dict(smoke_dict(steps=10)), path, log=lambda m: None)
    return train(RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1})), path, resume=True, log=lambda m: None)


@pytest.mark.parametrize("method,nth", [("probe", 11), ("evaluate", 2), ("save_checkpoint", 1), ("digest", 10)])
def test_a_replica_that_cannot_be_replaced_is_dropped_and_the_run_goes_on_exactly(tmp_path, reference, method,
                                                                                   nth):
    lines: list[str] = []
    cfg = RunConfig.from_dict(smoke_dict(**ELASTIC))
    result = train(cfg, tmp_path / "run", log=lines.append, pool=losing(method, nth))
    # Steps 1-10 on two replicas, 11-30 on the one left: the digest of a run resumed with one replica at step 10.
    assert result.final_digest == reference.final_digest
    assert replay_run(tmp_path / "run").digest == result.final_digest
    ledger = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    per_step = {}
    for row in ledger:
        per_step.setdefault(row["step"], []).append(row["replica"])
    assert sorted(per_step) == list(range(1, 31))  # no step lost or repeated
    assert all(per_step[k] == [0, 1] for k in range(1, 11)) and all(per_step[k] == [1] for k in range(11, 31))
    metrics = [r for r in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist() if r["kind"] == "train"]
    assert [r["replicas"] for r in metrics] == [2] * 10 + [1] * 20
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replica_drops"] == 1 and summary["steps_at_size"] == {"2": 10, "1": 20}
    assert summary["replicas"] == 1
    dropped = [line for line in lines if "could not be replaced" in line]
    assert len(dropped) == 1 and "replicas [0]" in dropped[0] and "goes on with 1 replicas" in dropped[0]


def test_below_the_minimum_the_run_stops_and_resumes_from_its_checkpoint(tmp_path, reference):
    cfg = RunConfig.from_dict(smoke_dict(**{**ELASTIC, "cluster.replicas": 3, "cluster.min_replicas": 2}))
    with pytest.raises(TrainingError, match=r"replicas \[0, 2\] were lost and not replaced within "
                                            r"cluster.replace_timeout_s=5s.*1 would be left, below "
                                            r"cluster.min_replicas=2.*newest checkpoint, step 10.*--resume"):
        train(cfg, tmp_path / "run", log=lambda m: None, pool=losing("probe", 15, slots=(0, 2)))
    # The run directory is resumable: here on the one replica left (a resume may change the replica count).
    resumed = train(RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1})), tmp_path / "run", resume=True,
                    log=lambda m: None)
    assert replay_run(tmp_path / "run").digest == resumed.final_digest


def test_replica_range_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"cluster.min_replicas.*got 3 with replicas=2.*use 0"):
        RunConfig.from_dict(smoke_dict(**{"cluster.min_replicas": 3}))
    with pytest.raises(ConfigError, match=r"cluster.batch_scaling.*in data mode cuts each step's batch.*weak.*"
                                          r"use cluster.batch_scaling strong"):
        RunConfig.from_dict(smoke_dict(**{"cluster.min_replicas": 1, "cluster.mode": "data"}))
    with pytest.raises(ConfigError, match=r"cluster.min_replicas.*got 1 with groups=2: every group needs a replica"):
        RunConfig.from_dict(smoke_dict(**{**DATA_RANGE, "cluster.mode": "hybrid", "cluster.groups": 2,
                                          "cluster.min_replicas": 1}))
    with pytest.raises(ConfigError, match=r"task.batch_size.*32 does not split evenly among \[3\] data shards.*"
                                          r"2-4 replicas present.*divisible by each of \[2, 3, 4\]"):
        RunConfig.from_dict(smoke_dict(**{**DATA_RANGE, "task.batch_size": 32}))
    with pytest.raises(ConfigError, match=r"cluster.replace_timeout_s.*use > 0"):
        RunConfig.from_dict(smoke_dict(**{"cluster.replace_timeout_s": 0}))
    assert not RunConfig.from_dict(smoke_dict(**{"cluster.min_replicas": 2})).cluster.elastic  # all needed


DATA_RANGE = {"cluster.mode": "data", "cluster.batch_scaling": "strong", "cluster.replicas": 4, "cluster.min_replicas": 2,
              "task.batch_size": 24, "cluster.replace_timeout_s": 5, "cluster.digest_every": 1}


@pytest.mark.parametrize("mode,lose,left", [("data", (1,), 3), ("hybrid", (1, 3), 2)])
def test_data_and_hybrid_mode_recut_the_batch_among_the_replicas_left(tmp_path, mode, lose, left):
    # 4 replicas (hybrid: 2 groups of 2) lose replicas after step 10 and go on with the others: the step's batch of
    # 24 examples is cut 4 ways, then 3 (data) or 1 per group (hybrid), and the directions per step stay the same.
    # Exactly a run of 10 steps on 4 replicas resumed with the replicas left.
    base = {**DATA_RANGE, "cluster.mode": mode, **({"cluster.groups": 2} if mode == "hybrid" else {})}
    ref = tmp_path / "reference"
    train(RunConfig.from_dict(smoke_dict(**{**base, "steps": 10})), ref, log=lambda m: None)
    resumed = train(RunConfig.from_dict(smoke_dict(**{**base, "cluster.replicas": left, "cluster.min_replicas": 0})),
                    ref, resume=True, log=lambda m: None)
    result = train(RunConfig.from_dict(smoke_dict(**base)), tmp_path / "run", log=lambda m: None,
                   pool=losing("probe", 11, lose))
    assert result.final_digest == resumed.final_digest
    assert replay_run(tmp_path / "run").digest == result.final_digest
    ledger = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    groups = 1 if mode == "data" else 2
    per_step: dict[int, list[int]] = {}
    for row in ledger:
        per_step.setdefault(row["step"], []).append(row["shards"])
    assert sorted(per_step) == list(range(1, 31))  # no step lost or repeated, the same directions every step
    assert all(per_step[k] == [4 // groups] * groups for k in range(1, 11))
    assert all(per_step[k] == [left // groups] * groups for k in range(11, 31))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_at_size"] == {"4": 10, str(left): 20} and summary["replica_drops"] == len(lose)


def test_uneven_groups_cut_their_own_batches_and_the_step_keeps_its_examples():
    from ray_s2p.data.batching import train_positions
    from ray_s2p.distributed.layout import Layout
    lay = Layout(5, 2, 1)  # 5 replicas in 2 groups: 3 and 2 members
    assert [lay.group(r) for r in range(5)] == [0, 0, 0, 1, 1] and [lay.shard(r) for r in range(5)] == [0, 1, 2, 0, 1]
    assert [lay.shards_of(g) for g in range(2)] == [3, 2] and [lay.first(g) for g in range(2)] == [0, 3]
    # Strong scaling: whatever the cut, the shards of a step together draw the same 24 examples.
    for step in (1, 7):
        cuts = [torch.cat([train_positions(100, 24 // n, seed=1, step=step, shard=s, num_shards=n) for s in range(n)])
                for n in (1, 2, 3, 4)]
        assert all(torch.equal(c, cuts[0]) for c in cuts)


class ReturningPool(LosingPool):
    """Loses replica 1 in the 5th probe call (no replacement starts); from the 15th probe call on, a replica
    for its slot has started (room came back) and waits to join; ``foreign`` makes that replica run elsewhere."""

    def __init__(self, config: RunConfig, foreign: bool = False, no_storage: bool = False) -> None:
        super().__init__(config, "probe", 5, (1,))
        self.foreign, self.no_storage = foreign, no_storage
        self.sent_away: list[int] = []  # slots dropped without being asked for again
        self.made: list[tuple[str, list[int]]] = []  # (method, slots called) of every call

    def waiting(self):
        return [1] if self.calls >= 15 and 1 not in self.slots and 1 not in self.sent_away else []

    def call(self, method, args, replicas=None, timeout=None):
        idx = list(range(self.size)) if replicas is None else list(replicas)
        self.made.append((method, [self.slots[r] for r in idx]))
        return super().call(method, args, replicas, timeout)

    def admit(self, slot):
        position = super().admit(slot)
        engine = self.engines[position]
        if self.foreign:
            env = {**engine.environment(), "torch": "0.0.0"}
            engine.environment = lambda: env
        if self.no_storage:  # started on a node that does not mount the run directory
            engine.check_storage = lambda run_dir, token: {"replica": slot, "host": "node-b",
                                                           "error": f"cannot read {run_dir} (no such directory)"}
        return position

    def drop(self, replica, rejoin=True):
        if not rejoin:
            self.sent_away.append(self.slots[replica])
        super().drop(replica, rejoin)


def test_a_replica_that_starts_later_joins_caught_up_and_the_run_uses_it(tmp_path):
    lines: list[str] = []
    cfg = RunConfig.from_dict(smoke_dict(**ELASTIC))
    pools: list[ReturningPool] = []

    def factory(config: RunConfig) -> ReturningPool:
        pools.append(ReturningPool(config))
        return pools[-1]
    result = train(cfg, tmp_path / "run", log=lines.append, pool=factory)
    summary = result.summary
    # What joining cost the run: between its admission and its first probe the joiner was asked only who it is,
    # whether it reaches the run directory, one checkpoint load and one replay of the ledger since it.
    made = pools[0].made
    first = next(i for i, (m, slots) in enumerate(made) if m == "info" and slots == [1] and i > 0)
    probe = next(i for i in range(first, len(made)) if made[i][0] == "probe" and 1 in made[i][1])
    assert [m for m, slots in made[first:probe] if 1 in slots] == ["info", "check_storage", "load_checkpoint",
                                                                  "replay"]
    assert summary["replica_drops"] == 1 and summary["replica_joins"] == 1
    # The joined replica caught up from the step-10 checkpoint and 4 ledger steps: its digest equals the other's
    # after every step (digest_every 1), so nothing was resynced.
    assert summary["replica_resyncs"] == 0 and summary["replicas"] == 2
    assert any("replica 1 joined (checkpoint of step 10 + 4 ledger steps); the run goes on with 2 replicas" in line
               for line in lines)
    assert summary["steps_at_size"] == {"2": 20, "1": 10}
    metrics = [r for r in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist() if r["kind"] == "train"]
    assert [r["replicas"] for r in metrics] == [2] * 4 + [1] * 10 + [2] * 16
    ledger = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    assert sorted({r["step"] for r in ledger}) == list(range(1, 31))
    assert [r["replica"] for r in ledger if r["step"] == 15] == [0, 1]
    assert replay_run(tmp_path / "run").digest == result.final_digest


def test_a_replica_in_another_environment_is_not_admitted(tmp_path):
    lines: list[str] = []
    cfg = RunConfig.from_dict(smoke_dict(**{**ELASTIC, "steps": 16}))
    result = train(cfg, tmp_path / "run", log=lines.append, pool=lambda c: ReturningPool(c, foreign=True))
    assert result.summary["replica_joins"] == 0 and result.summary["replicas"] == 1
    refused = [line for line in lines if "is not admitted" in line]
    assert len(refused) == 1 and "torch: " in refused[0] and "-> 0.0.0" in refused[0]  # sent away for good
    assert replay_run(tmp_path / "run").digest == result.final_digest


def test_a_replica_that_cannot_reach_the_run_directory_is_not_admitted(tmp_path):
    lines: list[str] = []
    cfg = RunConfig.from_dict(smoke_dict(**{**ELASTIC, "steps": 20}))
    pools: list[ReturningPool] = []

    def factory(config: RunConfig) -> ReturningPool:
        pools.append(ReturningPool(config, no_storage=True))
        return pools[-1]
    result = train(cfg, tmp_path / "run", log=lines.append, pool=factory)
    assert result.summary["replica_joins"] == 0 and result.summary["replicas"] == 1
    assert pools[0].sent_away == [1]  # not asked for again: it would land on such a node again
    refused = [line for line in lines if "run directory cannot be reached" in line]
    assert len(refused) == 1 and "replica 1 on host node-b: cannot read" in refused[0] and "shared filesystem" in refused[0]
    assert not (tmp_path / "run" / ".storage-check").exists() and replay_run(tmp_path / "run").digest == result.final_digest


@pytest.mark.slow
def test_on_a_ray_cluster_a_lost_node_drops_its_replica_and_a_new_node_brings_it_back(tmp_path):
    """A ray.cluster_utils.Cluster with no spare capacity: a head without CPUs and two 1-CPU worker nodes, one
    replica each. The run starts once the minimum (replica 0) is up; replica 1 joins when it has started (held
    here until after step 1). The node of replica 1 is removed after step 10: its replacement finds no room, it
    is dropped at once (no autoscaler can make room) and the run goes on with replica 0. After step 20 a node is added:
    the requested replica starts there, joins caught up and the run ends on two replicas, every step once in
    the ledger and its replay exact."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 100 * 1024 * 1024})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024) for _ in range(2)]
    lines: list[str] = []
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        # A long replace timeout: without an autoscaler a bundle with no room is dropped without waiting it out.
        cfg = RunConfig.from_dict(smoke_dict(**{**ELASTIC, "cluster.use_ray": True, "cluster.replace_timeout_s": 120,
                                                "cluster.step_timeout_s": 20, "log_every": 1}))
        removed_at: list[float] = []

        def wait_for_replica_1() -> None:
            deadline = time.monotonic() + 120
            while not driver.pool.waiting() and 1 not in driver.pool.slots and time.monotonic() < deadline:
                time.sleep(0.5)

        def report(metrics, checkpoint):
            if metrics["step"] == 1:
                wait_for_replica_1()
            if metrics["step"] == 10:
                position = driver.pool.slots.index(1)
                victim = next(n for n in nodes if n.node_id == driver.pool.node_ids()[position])
                cluster.remove_node(victim)
                removed_at.append(time.monotonic())
            if metrics["step"] == 11:
                removed_at.append(time.monotonic())
            if metrics["step"] == 20:
                cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
                wait_for_replica_1()  # the replica requested after the drop starts on the new node

        driver = Driver(cfg, tmp_path / "run", report=report, log=lines.append)
        result = driver.run()
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = result.summary
    assert summary["replica_drops"] == 1 and summary["replica_joins"] == 2 and summary["replicas"] == 2, lines
    assert removed_at[1] - removed_at[0] < 60, lines  # step 11 came long before the 120 s replace timeout
    assert any("no other node has room for it" in line for line in lines), lines
    # Replica 1 joins before step 1 when it is up in time, else after step 1 (the run does not wait for it);
    # then 2-10 on both, 11-20 on replica 0 alone, 21-30 on both again.
    joins = [line.split(": ", 1)[0] for line in lines if "replica 1 joined" in line]
    assert joins in (["step 0", "step 20"], ["step 1", "step 20"]), lines
    alone = 10 + (joins[0] == "step 1")
    assert summary["steps_at_size"] == {"2": 30 - alone, "1": alone}, lines
    rows = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    assert sorted({r["step"] for r in rows}) == list(range(1, 31))
    assert len(rows) == (30 - alone) * 2 + alone
    assert replay_run(tmp_path / "run").digest == result.final_digest


class ChurnPool(LocalPool):
    """Seeded churn: before a probe round, with probability ``p`` one random replica is lost (never below the
    minimum; its replacement never starts); a lost replica's slot comes back, waiting to join, after 3 to 30
    more probe rounds."""

    def __init__(self, config: RunConfig, seed: int, p: float) -> None:
        super().__init__(config)
        self.rng = random.Random(seed)
        self.p = p
        self.rounds = 0
        self.back_at: dict[int, int] = {}  # lost slot -> the probe round from which it waits to join
        self.losses = 0

    def call(self, method, args, replicas=None, timeout=None):
        idx = list(range(self.size)) if replicas is None else list(replicas)
        if method == "probe":
            self.rounds += 1
            if self.size > self.config.cluster.min_replicas and self.rng.random() < self.p:
                lost = self.rng.choice(idx)
                self.losses += 1
                self.back_at[self.slots[lost]] = self.rounds + self.rng.randint(3, 30)
                kept = [r for r in idx if r != lost]
                answers = dict(zip(kept, super().call(method, [a for r, a in zip(idx, args) if r != lost], kept)))
                raise ReplicaFailure([lost], [answers.get(r) for r in idx], f"replica {self.slots[lost]} died")
        return super().call(method, args, replicas, timeout)

    def replace(self, replica, timeout=None):
        raise ReplicaFailure([replica], [None], "no free bundle")

    def waiting(self):
        ready = sorted(slot for slot, at in self.back_at.items() if self.rounds >= at)
        for slot in ready:
            del self.back_at[slot]
        return ready


@pytest.mark.parametrize("mode", ["direction", "data", "hybrid"])
def test_a_churn_run_loses_and_regains_replicas_and_replays_to_its_digest(tmp_path, capsys, mode):
    """300 steps on 4 replicas with at least 2, replicas lost and regained at seeded random moments: every step
    once in the ledger, the digests agree at every check, and `replay --check` is exact. In data and hybrid mode
    (2 groups) the batch of 24 is re-cut among the replicas present and every step keeps its directions."""
    from ray_s2p.cli import main as cli

    modes = {"direction": {}, "data": DATA_RANGE, "hybrid": {**DATA_RANGE, "cluster.mode": "hybrid", "cluster.groups": 2}}
    cfg = RunConfig.from_dict(smoke_dict(**{**ELASTIC, **modes[mode], "steps": 300, "cluster.replicas": 4,
                                            "cluster.min_replicas": 2, "cluster.digest_every": 10,
                                            "checkpoint_every": 50, "eval_every": 100, "log_every": 50}))
    pools: list[ChurnPool] = []

    def factory(config: RunConfig) -> ChurnPool:
        pools.append(ChurnPool(config, seed=11, p=0.05))
        return pools[-1]

    result = train(cfg, tmp_path / "run", log=lambda m: None, pool=factory)
    summary = result.summary
    assert pools[0].losses >= 5 and summary["replica_drops"] == pools[0].losses
    assert summary["replica_joins"] >= 3 and summary["replica_resyncs"] == 0
    sizes = summary["steps_at_size"]
    assert sum(sizes.values()) == 300 and set(sizes) >= {"4", "3"} and set(sizes) <= {"4", "3", "2"}
    rows = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    present: dict[int, int] = {}  # replicas per step, from the ledger: a row per replica, or its group's shards
    directions: dict[int, int] = {}
    for row in rows:
        present[row["step"]] = present.get(row["step"], 0) + (row["shards"] or 1)
        directions[row["step"]] = directions.get(row["step"], 0) + 1
    assert sorted(present) == list(range(1, 301)) and set(present.values()) <= {2, 3, 4}
    if mode != "direction":  # the directions per step never change, the shards do
        assert set(directions.values()) == {cfg.directions_per_step} and len(set(present.values())) > 1
    metrics = [r for r in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist() if r["kind"] == "train"]
    assert [r["replicas"] for r in metrics] == [present[k] for k in range(1, 301)]
    capsys.readouterr()
    assert cli(["replay", str(tmp_path / "run"), "--check"]) == 0
    assert replay_run(tmp_path / "run").digest == result.final_digest
