"""``ray-s2p bench churn``: steps per minute of a run whose nodes come and go, against the same steps without churn.

Everything runs on a ``ray.cluster_utils.Cluster`` started on this machine: a head without CPUs (the driver's
node) and worker nodes with room for one replica each (``cluster.cpus_per_replica`` CPUs), so a removed node
takes its replica with it and nothing else has room for a replacement: the spot-instance case.

1. The churn run: a replica range (``cluster.replicas`` at most, ``cluster.min_replicas`` at least; defaults
   3 and 2) for ``--steps`` steps (default 300). At seeded moments (``--set seed``) the node of a random
   replica is removed, and a number of steps later a node is added; the driver drops the lost replica and
   asks for it again, and the replica started on the new node joins caught up (distributed/membership.py).
2. Runs without churn, one per replica count the churn run used, on the same cluster (nodes enough for each)
   and the same config and step count (so the same checkpoints and the same growth of the ledger and metrics
   files, which are rewritten at every logged step).

Step times come from metrics.parquet (``wall_seconds``, startup and the first step excluded, as the other
Driver benchmarks). The seconds the benchmark itself spends between steps removing a node, and adding one
and waiting until the replica requested for it has started (on a real cluster a new node brings its own CPUs
for that start-up; on this machine it would take the running replicas'), are subtracted from the churn run's
time. What churn costs the run is counted: the lost step redone, the grace for a lost bundle
(ray_pool.PLACEMENT_GRACE_S), and each join's checkpoint load and ledger replay.

Output keys (besides bench/time/machine/config):

- ``steps``, ``events``: [step, "remove" or "add"] as they happened (a removal waits while only the minimum
  is up: a loss then would stop the run), ``scheduled``: the seeded schedule;
- ``churn``: ``seconds`` (steps 2..S, node operations subtracted), ``steps_per_minute``, ``steps_at_size``,
  ``replica_drops``, ``replica_joins``, ``node_seconds`` (the subtracted time), ``recovery_seconds``,
  ``event_step_seconds`` ([step, kind, seconds of the step after it]: a loss's drop and redone step, a join's
  catch-up), ``median_step_seconds``, ``replay_exact`` (``replay_run`` of its ledger gives its final digest);
- ``fixed``: per replica count ``seconds_per_step`` without churn;
- ``expected_seconds``: the churn run's steps at each size times that size's step time (the same steps
  without churn), ``ratio``: expected_seconds / churn seconds (1.0: churn cost nothing);
- ``average_replicas`` (steps-weighted) and ``ratio_at_average``: churn steps per minute over the steps per
  minute without churn at the average count (interpolated between the counts measured);
- ``targets``: ``ratio_min`` 0.8 (steps per minute under churn within 20 % of the run without it), ``met``.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from ..distributed.driver import Driver, train
from ..distributed.replay import replay_run
from ..errors import RayS2PError
from .cluster import QUIET_RUN, train_rows
from .common import BenchContext, config_essentials, log

DEFAULT_STEPS = 300
RATIO_MIN = 0.8
START_WAIT_S = 300.0  # how long an added node's replica may take to start (model build) before the run goes on
NODE_OBJECT_STORE = 80 * 1024 * 1024  # bytes per worker node: small, the replicas exchange scalars only


def churn_schedule(steps: int, seed: int, removals: int) -> list[tuple[int, str]]:
    """Seeded (step, "remove" | "add") events: ``removals`` removals spread over the run, each followed by an
    addition 10-40 steps later, all after step 5 and at least 10 steps before the end."""
    rng = random.Random(seed)
    span = max(1, (steps - 50) // max(1, removals))
    events = []
    for k in range(removals):
        at = 5 + k * span + rng.randint(0, max(0, span // 3))
        back = min(steps - 10, at + rng.randint(10, 40))
        if back > at:
            events += [(at, "remove"), (back, "add")]
    return sorted(events)


def interpolated(per_size: dict[int, float], size: float) -> float:
    """Seconds per step at a (fractional) replica count, linear between the counts measured."""
    sizes = sorted(per_size)
    if size <= sizes[0]:
        return per_size[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if size <= hi:
            return per_size[lo] + (per_size[hi] - per_size[lo]) * (size - lo) / (hi - lo)
    return per_size[sizes[-1]]


def bench_churn(ctx: BenchContext) -> dict[str, Any]:
    """The ``churn`` benchmark (see the module docstring)."""
    import ray
    from ray.cluster_utils import Cluster

    steps = ctx.steps if ctx.steps is not None else DEFAULT_STEPS
    cfg = ctx.derive({**QUIET_RUN, "log_every": 1, "checkpoint_every": 50, "task.eval_size": 32,
                      "cluster.replicas": 3, "cluster.min_replicas": 2, "cluster.cpus_per_replica": 1,
                      "cluster.threads_per_replica": 1, "cluster.replace_timeout_s": 30},
                     {"steps": steps, "cluster.use_ray": True})
    c = cfg.cluster
    if not c.elastic:
        raise RayS2PError(f"the churn benchmark needs a replica range; got cluster.replicas={c.replicas}, "
                          f"cluster.min_replicas={c.min_replicas}. Fix: set cluster.min_replicas between 1 and "
                          f"cluster.replicas - 1")
    events = churn_schedule(steps, cfg.seed, removals=max(1, steps // 100))
    if ray.is_initialized():
        ray.shutdown()  # the benchmark's own cluster: nodes it can remove
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 2 * NODE_OBJECT_STORE})
    node_cpus = c.cpus_per_replica
    nodes = [cluster.add_node(num_cpus=node_cpus, object_store_memory=NODE_OBJECT_STORE) for _ in range(c.replicas)]
    spent: list[float] = []  # seconds spent on node operations between steps
    spent_at: dict[int, float] = {}  # step -> those seconds after it
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        pending = list(events)
        done: list[tuple[int, str]] = []  # the events as they happened (a removal waits for the minimum)

        def on_report(row: dict[str, Any], checkpoint: Path | None) -> None:
            while pending and pending[0][0] <= row["step"]:
                kind = pending[0][1]
                if kind == "remove" and driver.pool.size <= c.min_replicas:
                    return  # the last loss has not rejoined yet: this one waits (a loss now would stop the run)
                pending.pop(0)
                done.append((row["step"], kind))
                started = time.perf_counter()
                if kind == "remove":
                    hosts = driver.pool.node_ids()  # type: ignore[attr-defined]
                    pick = random.Random(cfg.seed * 1000 + row["step"]).randrange(len(hosts))
                    victim = next(n for n in nodes if n.node_id == hosts[pick])
                    nodes.remove(victim)
                    cluster.remove_node(victim)
                    log(f"  step {row['step']}: removed the node of replica {driver.pool.slots[pick]}")
                else:
                    nodes.append(cluster.add_node(num_cpus=node_cpus, object_store_memory=NODE_OBJECT_STORE))
                    # A new machine brings its own CPUs; here its replica's start-up would take the run's. So the
                    # run waits for it (not counted), and the join that follows (checkpoint + ledger) is counted.
                    deadline = time.monotonic() + START_WAIT_S
                    while not driver.pool.waiting() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                        time.sleep(0.2)
                    log(f"  step {row['step']}: added a node")
                spent.append(time.perf_counter() - started)
                spent_at[row["step"]] = spent_at.get(row["step"], 0.0) + spent[-1]

        with tempfile.TemporaryDirectory(prefix="ray-s2p-bench-") as tmp:
            log(f"  churn: {steps} steps, replicas {c.min_replicas}-{c.replicas}, events {events}")
            driver = Driver(cfg, Path(tmp) / "churn", report=on_report, log=log)
            result = driver.run()
            rows = train_rows(result.run_dir)
            replay_exact = replay_run(result.run_dir).digest == result.final_digest
            summary = result.summary
            churn_seconds = rows[-1]["wall_seconds"] - rows[0]["wall_seconds"] - sum(spent)
            walls = {r["step"]: r["wall_seconds"] for r in rows}
            # What each event cost the run: the step after it, less the benchmark's own node operations.
            event_costs = [[k, kind, walls[k + 1] - walls[k] - spent_at.get(k, 0.0)]
                           for k, kind in done if k + 1 in walls]
            gaps = sorted(walls[k + 1] - walls[k] - spent_at.get(k, 0.0) for k in walls if k + 1 in walls)
            while len(nodes) < c.replicas:  # the runs without churn: a node per replica again
                nodes.append(cluster.add_node(num_cpus=node_cpus, object_store_memory=NODE_OBJECT_STORE))
            sizes = sorted(int(n) for n in summary["steps_at_size"])
            fixed: dict[int, float] = {}
            for n in sizes:
                run_cfg = cfg.replace({"cluster.replicas": n, "cluster.min_replicas": 0})
                log(f"  without churn: {steps} steps on {n} replicas")
                fixed_rows = train_rows(train(run_cfg, Path(tmp) / f"fixed-{n}", log=log).run_dir)
                fixed[n] = ((fixed_rows[-1]["wall_seconds"] - fixed_rows[0]["wall_seconds"])
                            / (fixed_rows[-1]["step"] - fixed_rows[0]["step"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    at_size = {int(n): k for n, k in summary["steps_at_size"].items()}
    # The churn run's steps 2..S at each size: step 1 is not in the timed span, and it ran at the full range.
    timed = dict(at_size)
    timed[max(timed)] -= 1
    expected = sum(k * fixed[n] for n, k in timed.items())
    average = sum(n * k for n, k in at_size.items()) / sum(at_size.values())
    churn_rate = (steps - 1) / churn_seconds * 60.0
    ratio = expected / churn_seconds
    ratio_at_average = churn_rate / (60.0 / interpolated(fixed, average))
    return {"config": {**config_essentials(cfg), "replicas": c.replicas, "min_replicas": c.min_replicas,
                       "cpus_per_replica": node_cpus, "checkpoint_every": cfg.checkpoint_every},
            "steps": steps, "events": [list(e) for e in done], "scheduled": [list(e) for e in events],
            "churn": {"seconds": churn_seconds, "steps_per_minute": churn_rate, "steps_at_size": summary["steps_at_size"],
                      "replica_drops": summary["replica_drops"], "replica_joins": summary["replica_joins"],
                      "node_seconds": sum(spent), "recovery_seconds": summary["recovery_seconds"],
                      "event_step_seconds": event_costs, "median_step_seconds": gaps[len(gaps) // 2],
                      "replay_exact": replay_exact},
            "fixed": {str(n): {"seconds_per_step": s, "steps_per_minute": 60.0 / s} for n, s in fixed.items()},
            "expected_seconds": expected, "ratio": ratio, "average_replicas": average,
            "ratio_at_average": ratio_at_average,
            "targets": {"ratio_min": RATIO_MIN, "met": ratio >= RATIO_MIN and ratio_at_average >= RATIO_MIN}}


__all__ = ["bench_churn", "churn_schedule", "interpolated"]
