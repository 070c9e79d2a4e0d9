"""The wall-clock side of ``ray-s2p bench speedup``: what N Ray replicas cost per step, and how soon they
reach a target.

Steps to a target S(Q) (speedup.py) say how many steps N replicas need with one direction each
(Q = N in direction mode). What a step costs with N replicas is measured and modelled here:

- ``step_times``: seconds per step of real Driver runs with 1 and 2 Ray replicas in direction mode
  (one thread and one CPU each), the way ``bench scaling`` times them;
- ``engine_costs``: on one in-process engine, T_p (one direction's two probes on real batches) and
  u(N) (applying a step's N (seed, coefficient) pairs) for N up to 64, each timed, not extrapolated;
- the model ``T(N) = T_p + u(N) + t_d``: every replica probes its own direction at once, then applies
  all N pairs; t_d, the driver's round trip and Ray's overhead, is what the 1-replica run leaves after
  T_p + u(1). The 2-replica run checks the model (``model_check``);
- ``projection``: the time-to-target speed-up S(1) T(1) / (S(N) T(N)) per N from measured S and
  modelled T, next to the linear N, and which term stops it (steps: E(N) < 1; time: u(N) grows);
- ``time_to_target``: one real measurement, 1 against 2 Ray replicas on this machine, same config,
  the wall-clock seconds (replica start-up excluded, evaluations included) until the evaluated
  accuracy first reaches the target, interpolated between evaluations; repeated in alternating order.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow.parquet as pq

from ..config import RunConfig
from ..distributed.driver import train
from ..distributed.engine import ReplicaEngine
from ..distributed.messages import ProbeRequest
from ..zo.noise import mix_seed
from ..zo.update import apply_update
from .cluster import QUIET_RUN, ensure_ray, seconds_per_step, train_rows
from .common import BENCH_SEED, median_seconds
from .speedup_fit import steps_to_target

UPDATE_AT = (1, 2, 4, 8, 16, 32, 64)  # N at which u(N) is timed
RAY_ONE_CPU = {"cluster.use_ray": True, "cluster.mode": "direction", "cluster.threads_per_replica": 1,
               "cluster.cpus_per_replica": 1, "optimizer.directions": 1}


def ray_config(config: RunConfig, replicas: int, overrides: dict[str, Any] | None = None) -> RunConfig:
    """``config`` on ``replicas`` Ray replicas in direction mode, one direction, one thread and CPU each."""
    return config.replace({**RAY_ONE_CPU, "cluster.replicas": replicas, **(overrides or {})})


def step_times(config: RunConfig, steps: int, log: Callable[[str], None]) -> dict[int, float]:
    """Seconds per step of Driver runs with 1 and 2 Ray replicas (no evaluations, checkpoints or digests),
    over the last quarter of ``steps``: the first steps fill the caches (a task with frozen layers computes
    each example's features once, in the first epoch), as they do in a long run."""
    ensure_ray()
    out: dict[int, float] = {}
    warm = steps * 3 // 4
    with tempfile.TemporaryDirectory(prefix="ray-s2p-speedup-") as tmp:
        for replicas in (1, 2):
            cfg = ray_config(config, replicas, {**QUIET_RUN, "steps": steps, "log_every": max(1, steps // 20),
                                                 "task.eval_split": "validation"})
            log(f"  {steps} steps on {replicas} Ray replica(s), timed after step {warm}")
            result = train(cfg, Path(tmp) / f"replicas-{replicas}", log=log)
            out[replicas] = seconds_per_step([r for r in train_rows(result.run_dir) if r["step"] >= warm])
    return out


def engine_costs(config: RunConfig, repeats: int, at: Sequence[int] = UPDATE_AT,
                 shards: Sequence[int] = ()) -> dict[str, Any]:
    """T_p and u(N) on one in-process engine with one thread (what one replica of ``ray_config`` does).

    ``shards``: also T_p on a batch of ``task.batch_size / n`` examples for each n (``probe_seconds_shard``),
    what a replica of n data-mode replicas with strong batch scaling probes.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = ReplicaEngine(config.replace({"cluster.use_ray": False, "cluster.replicas": 1,
                                               "cluster.threads_per_replica": 1}), 0)
        rho = config.optimizer.rho
        counter = itertools.count(1)

        def probe_of(eng: ReplicaEngine) -> Callable[[], None]:
            def probe() -> None:  # step 1's batch every time: after the warm-up call its features are cached,
                k = next(counter)  # as every batch's are after a run's first epoch; a fresh direction each call
                eng.probe(ProbeRequest(1, (mix_seed(BENCH_SEED, k),), (rho, -rho), 0, 1, None))
            return probe
        probe = probe_of(engine)
        batch = config.task.batch_size
        shard_probe = {}
        for n in shards:  # a strong-scaling shard's batch: the same engine work on B / n examples
            small = ReplicaEngine(config.replace({"cluster.use_ray": False, "cluster.replicas": 1,
                                                  "cluster.threads_per_replica": 1,
                                                  "task.batch_size": max(1, batch // n)}), 0)
            shard_probe[n] = median_seconds(probe_of(small), repeats, small.device)

        def update_of(n: int) -> Callable[[], None]:
            calls = itertools.count()

            def update() -> None:  # fresh seeds each call: regenerating the directions is the cost
                k = next(calls)
                apply_update(engine.space, [(mix_seed(BENCH_SEED, 11, k, j), 1e-9 * (-1) ** j) for j in range(n)],
                             step=1)
            return update
        return {"probe_seconds": median_seconds(probe, repeats, engine.device), "probe_seconds_shard": shard_probe,
                "update_seconds_at": {n: median_seconds(update_of(n), max(1, min(repeats, 3)), engine.device)
                                      for n in at},
                "trainable_parameters": engine.space.dim}
    finally:
        torch.set_num_threads(before)


def step_model(costs: dict[str, Any], measured: dict[int, float]) -> dict[str, Any]:
    """T(N) = T_p + u(N) + t_d with t_d from the 1-replica run; the 2-replica run as its check."""
    tp, u = costs["probe_seconds"], costs["update_seconds_at"]
    t_d = max(0.0, measured[1] - tp - u[1])
    modelled = {n: tp + u[n] + t_d for n in u}
    check = {"measured_2": measured.get(2), "modelled_2": modelled.get(2),
             "ratio": (measured[2] / modelled[2]) if 2 in measured and modelled.get(2) else None}
    return {"driver_seconds": t_d, "seconds_per_step": modelled, "model_check": check}


def projection(s_of_q: dict[int, float], seconds: dict[int, float]) -> dict[int, dict[str, Any]]:
    """Time-to-target speed-up S(1) T(1) / (S(N) T(N)) for every N with both a measured S and a modelled T.

    Each row also gives E(N) = S(1) / (N S(N)) and T(1) / T(N), the two factors of the speed-up over
    the linear N, so the table says which term stops it.
    """
    out: dict[int, dict[str, Any]] = {}
    if 1 not in s_of_q or 1 not in seconds:
        return out
    for n in sorted(set(s_of_q) & set(seconds)):
        steps_eff = s_of_q[1] / (n * s_of_q[n])
        time_eff = seconds[1] / seconds[n]
        out[n] = {"speedup": n * steps_eff * time_eff, "linear": n, "step_efficiency": steps_eff,
                  "time_per_step_ratio": time_eff,
                  "limited_by": "steps" if steps_eff < time_eff else "time per step"}
    return out


def wall_to_target(run_dir: Path, target: float) -> float | None:
    """Wall seconds (since the replicas were up) at which the evaluated accuracy first reaches ``target``."""
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    evals = sorted(((r["wall_seconds"], r["eval_accuracy"]) for r in rows
                    if r["kind"] == "eval" and r.get("eval_accuracy") is not None), key=lambda x: x[0])
    return steps_to_target(evals, target)


def time_to_target(config: RunConfig, target: float, steps_one: int, repeats: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """1 against 2 Ray replicas, same config, wall-clock until the validation accuracy reaches ``target``.

    Each run gets ``steps_one / replicas`` steps (the benchmark's B(1) and B(2): the same budget and decay
    horizon as the runs S(Q) was measured with) and 25 evaluations; runs alternate 1, 2, 1, 2, ... so both
    see the same machine. Repeat r runs seed ``config.seed + r`` at both replica counts: one seed repeated
    would only time the same trajectory's crossing again, while S(Q) is an average over seeds.
    """
    ensure_ray()
    runs: dict[int, list[float | None]] = {1: [], 2: []}
    seeds = [config.seed + rep for rep in range(repeats)]
    with tempfile.TemporaryDirectory(prefix="ray-s2p-speedup-") as tmp:
        for rep, seed in enumerate(seeds):
            for replicas in (1, 2):
                steps = max(1, steps_one // replicas)
                cfg = ray_config(config, replicas, {"steps": steps, "eval_every": max(1, steps // 25),
                                                    "log_every": max(1, steps // 25), "checkpoint_every": 0,
                                                    "progress": False, "cluster.digest_every": 0,
                                                    "task.eval_split": "validation", "seed": seed})
                log(f"  time to {target}: {replicas} Ray replica(s), {steps} steps (seed {seed})")
                result = train(cfg, Path(tmp) / f"r{replicas}-{rep}", log=log)
                runs[replicas].append(wall_to_target(Path(result.run_dir), target))
    # A run already at the target when it starts (0 s) gives no ratio: only pairs that both had to train count.
    reached = [(a, b) for a, b in zip(runs[1], runs[2]) if a and b]
    ratios = [a / b for a, b in reached]
    return {"target": target, "seeds": seeds, "seconds_one": runs[1], "seconds_two": runs[2], "speedups": ratios,
            "speedup_median": statistics.median(ratios) if ratios else None,
            "speedup_range": [min(ratios), max(ratios)] if ratios else None}


def mode_times(s_of_q: dict[int, float], s_weak: dict[int, float], costs: dict[str, Any],
               model: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Modelled seconds to the target of N replicas in each mode, from measured steps and step costs.

    - direction: S(Q = N) steps of T(N) = T_p + u(N) + t_d;
    - data, weak scaling (each replica draws task.batch_size, the batch grows N-fold, Q = 1): the measured
      S_weak(N) steps of T_p + u(1) + t_d;
    - data, strong scaling (the batch split N ways, Q = 1): the computation of one replica, S(1) steps, of
      T_p(B / N) + u(1) + t_d.
    """
    t_d, u = model["driver_seconds"], costs["update_seconds_at"]
    tp, shard = costs["probe_seconds"], costs.get("probe_seconds_shard", {})
    out: dict[int, dict[str, Any]] = {}
    for n in sorted(set(s_of_q) | set(s_weak)):
        if n < 2:
            continue
        row: dict[str, Any] = {}
        if n in s_of_q and n in model["seconds_per_step"]:
            row["direction"] = s_of_q[n] * model["seconds_per_step"][n]
        if n in s_weak:
            row["data_weak"] = s_weak[n] * (tp + u[1] + t_d)
        if 1 in s_of_q and n in shard:
            row["data_strong"] = s_of_q[1] * (shard[n] + u[1] + t_d)
        if row:
            row["first"] = min(row, key=row.get)
            out[n] = row
    return out


def measure_task(config: RunConfig, s_of_q: dict[int, float], target: float, *, ray_steps: int, repeats: int,
                 shards: Sequence[int], time_repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The wall-clock side of one task: Ray step times, engine costs, the model, the projection, and (with a
    measured S(1)) 1 against 2 Ray replicas timed to ``target``. Needs a quiet machine and 2 CPUs for Ray."""
    log("  engine costs (T_p, u(N))")
    costs = engine_costs(config, repeats, shards=shards)
    measured = step_times(config, ray_steps, log)
    model = step_model(costs, measured)
    out = {"ray_seconds_per_step": measured, "costs": costs, "model": model,
           "projection": projection(s_of_q, model["seconds_per_step"])}
    if 1 in s_of_q and time_repeats > 0:  # the measured runs' own budget: B(1) steps for 1, B(2) for 2
        out["time_to_target"] = time_to_target(config, target, config.steps, time_repeats, log)
    return out

