"""``ray-s2p bench scaling | traffic | recovery | replay``: whole training runs through the Driver.

Step times come from metrics.parquet: ``wall_seconds`` of the first and last
train rows, so replica startup and the initial evaluation (both before step 1
ends) are excluded. Runs go to a temporary directory that is removed afterwards.

Output keys (besides bench/time/machine/config):

- scaling: ``steps``, ``runs`` (per replica count: ``replicas``,
  ``seconds_per_step``, ``directions_per_s``), ``efficiency`` = dps(2) / (2 dps(1)),
  ``probe_seconds`` (T_p: one direction's two probes on one engine),
  ``update_seconds`` {gaussian, table, rademacher, lowrank} (u: apply_update with one pair),
  ``projected_efficiency`` {the same} x {8, 64, 512} = (T_p + u) / (T_p + N u)
  (with N replicas each replica applies N pairs per step; for lowrank u(N) is measured:
  ``lowrank_update_seconds_at`` and (T_p + u(1)) / (T_p + u(N)); ``lowrank_shared_v`` the same
  with lazy V, ``lowrank_shared_v_interval`` steps per V, where a step's N pairs share V and
  collapse to one rank-r product), ``targets``;
  ``floor_runs`` (the same step work in 1 and 2 plain processes, no Ray and no
  driver, started together: what the machine itself allows), ``floor_efficiency``
  = floor dps(2) / (2 floor dps(1)) and ``efficiency_vs_floor`` = dps(2) / floor dps(2).
- traffic: ``trainable_parameters`` (d), ``allreduce_bytes`` (4 d, one fp32
  gradient all-reduce), ``bytes_per_step_per_replica`` per replica count, the
  worst of them, ``ratio_to_allreduce``, ``targets`` (<= 1024 B).
- recovery: ``steps``, ``killed_replica``, ``kill_after_step``,
  ``recovery_seconds`` (the driver's replace + restore times),
  ``kill_to_next_step_s`` (SIGKILL to the end of the next completed step),
  ``step_seconds`` (median undisturbed step), ``replica_failures``.
- replay: ``steps``, ``train_steps_per_s``, ``replay_seconds``,
  ``replay_steps_per_s``, ``speedup``, ``digest_match``, ``targets`` (>= 10x; >= 20x with low-rank).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from ..config import RunConfig
from ..distributed.driver import Driver, train
from ..distributed.engine import ReplicaEngine, build_space
from ..distributed.messages import ProbeRequest, Update
from ..errors import RayS2PError
from ..zo.noise import mix_seed
from ..zo.update import apply_update
from .common import BENCH_SEED, BenchContext, config_essentials, log, median_seconds

PROJECT_AT = (8, 64, 512)

# What every benchmark run turns off: periodic evals, checkpoints and digests would be
# timed as part of the steps they follow. The final checkpoint and digest still happen.
QUIET_RUN = {"eval_every": 0, "checkpoint_every": 0, "progress": False, "tensorboard": False,
             "cluster.digest_every": 0}


def ensure_ray() -> Any:
    """Start a local Ray sized to this machine, unless one is running (or RAY_ADDRESS names a cluster)."""
    import ray
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)  # joining a cluster: its size is its own
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The train rows of metrics.parquet, by step."""
    rows = pq.read_table(Path(run_dir) / "metrics.parquet").to_pylist()
    return sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])


def seconds_per_step(rows: list[dict[str, Any]]) -> float:
    """Mean step time between the first and last train rows (startup and initial eval excluded)."""
    if len(rows) < 2:
        raise RayS2PError("need at least 2 steps to time one. Fix: use --steps 2 or more")
    return (rows[-1]["wall_seconds"] - rows[0]["wall_seconds"]) / (rows[-1]["step"] - rows[0]["step"])


def run_config(ctx: BenchContext, bench: str, overrides: dict[str, Any], fixed: dict[str, Any]) -> RunConfig:
    """A quiet Driver run of the bench's step count (small held-out set: it is evaluated at the start and end).

    ``fixed`` (and the step count, which --steps sets) win over --set; see ``BenchContext.derive``.
    """
    steps = ctx.steps_for(bench)
    return ctx.derive({**QUIET_RUN, "log_every": steps, "task.eval_size": min(ctx.config.task.eval_size, 32),
                       **overrides}, {"steps": steps, **fixed})


# ----------------------------------------------------------------- scaling
def scaling_runs(ctx: BenchContext) -> list[dict[str, Any]]:
    """Driver runs with 1 and 2 Ray replicas in direction mode (cached: traffic reads the same runs)."""
    if "scaling_runs" in ctx.cache:
        return ctx.cache["scaling_runs"]
    ray = ensure_ray()
    if ray.cluster_resources().get("CPU", 0) < 2:
        raise RayS2PError("the scaling runs need 2 CPUs in the Ray cluster")
    out = []
    with tempfile.TemporaryDirectory(prefix="ray-s2p-bench-") as tmp:
        for replicas in (1, 2):
            cfg = run_config(ctx, "scaling", {"cluster.threads_per_replica": 1, "cluster.cpus_per_replica": 1},
                             {"cluster.use_ray": True, "cluster.replicas": replicas, "cluster.mode": "direction"})
            log(f"  {cfg.steps} steps with {replicas} Ray replica(s)")
            result = train(cfg, Path(tmp) / f"replicas-{replicas}", log=log)
            sps = seconds_per_step(train_rows(result.run_dir))
            s = result.summary
            out.append({"replicas": replicas, "threads_per_replica": cfg.cluster.threads_per_replica,
                        "seconds_per_step": sps,
                        "directions_per_s": replicas * cfg.optimizer.directions / sps,
                        "bytes_sent_per_step": s["bytes_sent_per_step"],
                        "bytes_received_per_step": s["bytes_received_per_step"]})
    ctx.cache["scaling_runs"] = out
    return out


def _floor_worker(config: RunConfig, replica: int, replicas: int, steps: int, barrier: Any, results: Any) -> None:
    """One plain process doing a direction-mode replica's work: its probes, then all ``replicas`` update pairs."""
    try:
        engine = ReplicaEngine(config, replica)
        rho = config.optimizer.rho

        def step(k: int) -> None:
            update = None
            if k > 1:  # the previous step's update, one pair per replica, as the driver sends it
                update = Update(k - 1, tuple((mix_seed(BENCH_SEED, k - 1, j), 1e-7) for j in range(replicas)))
            engine.probe(ProbeRequest(k, (mix_seed(BENCH_SEED, k, replica),), (rho, -rho), 0, 1, update))

        step(1)  # warm-up (first-call allocations) outside the timing
        barrier.wait(timeout=600)
        start = time.perf_counter()
        for k in range(2, steps + 2):
            step(k)
        results.put((replica, (time.perf_counter() - start) / steps, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        results.put((replica, None, repr(exc)))


def floor_runs(ctx: BenchContext) -> list[dict[str, Any]]:
    """The scaling runs' step work in 1 and 2 plain processes started together, without Ray or a driver.

    This is the machine's own ceiling for N replicas (shared cores, memory bus,
    caches); the gap between it and the Ray runs is what Ray and the driver cost.
    """
    cfg = ctx.local_config().replace({"cluster.threads_per_replica": 1, **ctx.user_sets})
    steps = max(2, ctx.steps_for("scaling"))
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    out = []
    for replicas in (1, 2):
        barrier, results = spawn.Barrier(replicas), spawn.Queue()
        procs = [spawn.Process(target=_floor_worker, args=(cfg, r, replicas, steps, barrier, results))
                 for r in range(replicas)]
        for proc in procs:
            proc.start()
        try:
            got = [results.get(timeout=900) for _ in procs]
        finally:
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
        errors = [err for _, _, err in got if err]
        if errors:
            raise RuntimeError(f"bench scaling: a floor process failed: {errors[0]}")
        per_step = [s for _, s, _ in sorted(got)]
        out.append({"replicas": replicas, "seconds_per_step": max(per_step), "process_seconds_per_step": per_step,
                    "directions_per_s": replicas / max(per_step)})
    return out


SHARED_V_INTERVAL = 10  # lazy V's window when the config has none (lowrank_interval 1)


def engine_costs(ctx: BenchContext, threads: int | None) -> dict[str, Any]:
    """T_p (one direction's probes, +rho and -rho, on real batches) and u (one update pair) on one engine.

    Measured with the replicas' thread count on CPU, so T_p and u are those of a replica.
    """
    cfg = ctx.local_config()
    before = torch.get_num_threads()
    if threads and cfg.cluster.gpus_per_replica == 0:
        torch.set_num_threads(threads)
    try:
        engine = ReplicaEngine(cfg, 0, task=ctx.task())
        ctx.cache["trainable_parameters"] = engine.space.dim  # traffic needs d: no second model build
        rho = cfg.optimizer.rho
        counter = itertools.count(1)

        def probe() -> None:
            k = next(counter)
            engine.probe(ProbeRequest(k, (mix_seed(BENCH_SEED, k),), (rho, -rho), 0, 1, None))

        def update(distribution: str) -> float:
            from .step import update_fn
            space = build_space(engine.model, engine.trainable,
                                cfg.replace({"perturbation.distribution": distribution}))
            return median_seconds(update_fn(space), ctx.repeats, engine.device)

        def lowrank_update_at(n: int, interval: int) -> float:
            # A low-rank update of n pairs is one product per matrix: measure it, do not extrapolate from one pair.
            space = build_space(engine.model, engine.trainable,
                                cfg.replace({"perturbation.distribution": "lowrank",
                                             "perturbation.lowrank_interval": interval}))
            calls = itertools.count()

            def update() -> None:  # fresh seeds every call: drawing the factors is part of the cost
                k = next(calls)
                apply_update(space, [(mix_seed(BENCH_SEED, 7, k, j), 1e-7 * (-1) ** j) for j in range(n)], step=1)
            return median_seconds(update, max(1, min(ctx.repeats, 3)), engine.device)

        interval = cfg.perturbation.lowrank_interval
        shared = interval if interval > 1 else SHARED_V_INTERVAL
        return {"probe_seconds": median_seconds(probe, ctx.repeats, engine.device),
                "lowrank_update_seconds_at": {str(n): lowrank_update_at(n, interval) for n in PROJECT_AT},
                "lowrank_shared_v_interval": shared,
                "lowrank_shared_v_update_seconds_at": {str(n): lowrank_update_at(n, shared) for n in PROJECT_AT},
                "update_seconds": {d: update(d) for d in ("gaussian", "table", "rademacher", "lowrank")},
                "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(before)


def bench_scaling(ctx: BenchContext) -> dict[str, Any]:
    """The ``scaling`` benchmark."""
    runs = scaling_runs(ctx)
    one, two = runs
    efficiency = two["directions_per_s"] / (2 * one["directions_per_s"])
    log("  per-direction costs on one engine")
    costs = engine_costs(ctx, ctx.derive({"cluster.threads_per_replica": 1}).cluster.threads_per_replica)
    tp = costs["probe_seconds"]
    projected = {dist: {str(n): (tp + u) / (tp + n * u) for n in PROJECT_AT}
                 for dist, u in costs["update_seconds"].items() if dist != "lowrank"}
    # Low-rank: every replica applies the N pairs of a step in one product, timed at each N.
    u_lr = costs["update_seconds"]["lowrank"]
    projected["lowrank"] = {n: (tp + u_lr) / (tp + u) for n, u in costs["lowrank_update_seconds_at"].items()}
    # Lazy V shared by a step's directions: the N pairs collapse to one rank-r product per matrix.
    shared = costs["lowrank_shared_v_update_seconds_at"]
    projected["lowrank_shared_v"] = {n: (tp + u_lr) / (tp + u) for n, u in shared.items()}
    log("  the same work in 1 and 2 plain processes (no Ray, no driver)")
    floor = floor_runs(ctx)
    return {"config": {**config_essentials(ctx.config), "mode": "direction"}, "steps": ctx.steps_for("scaling"),
            "runs": [{k: r[k] for k in ("replicas", "threads_per_replica", "seconds_per_step", "directions_per_s")}
                     for r in runs],
            "efficiency": efficiency, "probe_seconds": tp, "update_seconds": costs["update_seconds"],
            "lowrank_update_seconds_at": costs["lowrank_update_seconds_at"],
            "lowrank_shared_v_interval": costs["lowrank_shared_v_interval"],
            "lowrank_shared_v_update_seconds_at": shared,
            "cost_threads": costs["threads"], "projected_efficiency": projected,
            "floor_runs": floor, "floor_efficiency": floor[1]["directions_per_s"] / (2 * floor[0]["directions_per_s"]),
            "efficiency_vs_floor": two["directions_per_s"] / floor[1]["directions_per_s"],
            "targets": {"efficiency_min": 0.9, "met": efficiency >= 0.9,
                        "lowrank_projected_at_64_min": 0.95,
                        "lowrank_projected_at_64_met": projected["lowrank"]["64"] >= 0.95,
                        "lowrank_shared_v_projected_at_64_met": projected["lowrank_shared_v"]["64"] >= 0.95}}


# ----------------------------------------------------------------- traffic
def trainable_count(ctx: BenchContext) -> int:
    """d, the number of trainable scalars of the base config's model."""
    if "trainable_parameters" not in ctx.cache:
        task = ctx.task()
        model = task.build_model()
        names = set(task.trainable_names(model))
        ctx.cache["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters() if n in names)
    return ctx.cache["trainable_parameters"]


def bench_traffic(ctx: BenchContext) -> dict[str, Any]:
    """The ``traffic`` benchmark (reuses the scaling runs when they ran in this call)."""
    runs = scaling_runs(ctx)
    d = trainable_count(ctx)
    per_replica = {str(r["replicas"]): (r["bytes_sent_per_step"] + r["bytes_received_per_step"]) / r["replicas"]
                   for r in runs}
    worst = max(per_replica.values())
    return {"config": {**config_essentials(ctx.config), "mode": "direction"}, "steps": ctx.steps_for("traffic"),
            "trainable_parameters": d, "allreduce_bytes": 4 * d, "bytes_per_step_per_replica": per_replica,
            "worst_bytes_per_step_per_replica": worst, "ratio_to_allreduce": worst / (4 * d),
            "targets": {"bytes_max": 1024, "met": worst <= 1024}}


# ----------------------------------------------------------------- recovery
def bench_recovery(ctx: BenchContext) -> dict[str, Any]:
    """The ``recovery`` benchmark: SIGKILL replica 1's worker process after a step, train on."""
    ensure_ray()
    cfg = run_config(ctx, "recovery", {"cluster.threads_per_replica": 1, "cluster.cpus_per_replica": 1},
                     {"cluster.use_ray": True, "cluster.replicas": 2, "cluster.mode": "direction", "log_every": 1})
    kill_after = max(1, cfg.steps // 3)
    killed: dict[str, Any] = {}

    def on_report(row: dict[str, Any], checkpoint: Path | None) -> None:
        if killed or row["step"] < kill_after:
            return
        # Driver time at this moment, as an offset of the driver's clock: the row of this step
        # was recorded (wall_seconds) just before the callback, so this overestimates the later
        # kill-to-step time by at most the metrics flush in between (milliseconds).
        entered = time.perf_counter()
        recorded = driver.rd.rows[-1]["wall_seconds"]
        pid = driver.pool.pids()[1]
        os.kill(pid, signal.SIGKILL)
        killed.update(step=row["step"], pid=pid, at=recorded + (time.perf_counter() - entered))

    with tempfile.TemporaryDirectory(prefix="ray-s2p-bench-") as tmp:
        driver = Driver(cfg, Path(tmp) / "recovery", report=on_report, log=log)
        result = driver.run()
        rows = train_rows(result.run_dir)
    if not killed:
        raise RayS2PError("the replica was never killed (too few steps?). Fix: use --steps 3 or more")
    s = result.summary
    after = [r for r in rows if r["step"] > killed["step"]]
    gaps = [(b["step"], b["wall_seconds"] - a["wall_seconds"]) for a, b in zip(rows, rows[1:])]
    normal = [g for step, g in gaps if step != killed["step"] + 1]
    return {"config": {**config_essentials(cfg), "replicas": cfg.cluster.replicas}, "steps": cfg.steps,
            "killed_replica": 1, "kill_after_step": killed["step"],
            "recovery_seconds": s["recovery_seconds"], "recovery_seconds_total": sum(s["recovery_seconds"]),
            "kill_to_next_step_s": after[0]["wall_seconds"] - killed["at"] if after else None,
            "step_seconds": statistics.median(normal) if normal else None,
            "replica_failures": s["replica_failures"], "steps_completed": s["steps_completed"]}


# ----------------------------------------------------------------- replay
def bench_replay(ctx: BenchContext) -> dict[str, Any]:
    """The ``replay`` benchmark: a short in-process run, then replay_run of its ledger."""
    from ..distributed.replay import replay_run

    local = ctx.local_config().cluster  # on a GPU machine the in-process replica uses the GPU
    cfg = run_config(ctx, "replay", {"cluster.gpus_per_replica": local.gpus_per_replica},
                     {"cluster.use_ray": False, "cluster.replicas": 1})
    with tempfile.TemporaryDirectory(prefix="ray-s2p-bench-") as tmp:
        log(f"  training {cfg.steps} steps in-process")
        result = train(cfg, Path(tmp) / "replay", log=log)
        train_sps = 1.0 / seconds_per_step(train_rows(result.run_dir))
        log("  replaying the ledger")
        replayed = replay_run(result.run_dir)
    replay_sps = replayed.step / replayed.seconds if replayed.seconds > 0 else float("inf")
    speedup = replay_sps / train_sps
    minimum = 20.0 if cfg.perturbation.distribution == "lowrank" else 10.0
    return {"config": {**config_essentials(cfg), "replicas": 1, "device": str(replayed.engine.device)},
            "steps": cfg.steps, "train_steps_per_s": train_sps, "replay_seconds": replayed.seconds,
            "replay_steps_per_s": replay_sps, "speedup": speedup,
            "digest_match": replayed.digest == result.final_digest,
            "targets": {"speedup_min": minimum, "met": speedup >= minimum}}


__all__ = ["bench_recovery", "bench_replay", "bench_scaling", "bench_traffic", "engine_costs", "ensure_ray",
           "scaling_runs", "seconds_per_step"]
