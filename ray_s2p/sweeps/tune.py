"""Ray Tune searches over a run config's optimizer settings, and the equal-budget comparison.

Each trial runs a full ``Driver`` whose replica actors live in the trial's own
placement group (``PlacementGroupFactory([driver] + [replica] * n)``), reports
metrics with ``tune.report`` and a small checkpoint (the newest trainer
checkpoint plus ledger and metrics) so an interrupted trial resumes exactly.
A sweep resumes with ``Tuner.restore``.

Equal budget: every optimizer gets the same number of forward passes (steps =
budget / passes per step) and the same number of trials. Passes per step:
two-point rules 2q (ZO-signSGD too: its sign update costs no forward pass), STP
3q, S2P/VS2P without the sign trick at options 2/4 4q, first-order 3 (one forward
plus a backward counted as two forwards).

Tuning reads the validation split only: a base config whose ``task.eval_split`` is
``test`` is refused, so no step size is ever chosen on the examples a final table
reports (``compare`` reruns the chosen settings on the test split).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import FIRST_ORDER, FIRST_ORDER_PASSES, ConfigError, RunConfig
from ..errors import RayS2PError
from .protocol import log_grid

# Search spaces per optimizer: dotted key -> (low, high) sampled log-uniformly.
SPACES: dict[str, dict[str, tuple[float, float]]] = {
    "vs2p": {"optimizer.eta": (0.1, 5.0), "optimizer.rho": (1e-4, 1e-1)},
    "s2p": {"optimizer.lr": (1e-4, 1e-1), "optimizer.rho": (1e-4, 1e-1)},
    "mezo": {"optimizer.lr": (1e-5, 1.0), "optimizer.rho": (1e-4, 1e-1)},
    "zo_sign": {"optimizer.lr": (1e-5, 1e-1), "optimizer.rho": (1e-4, 1e-1)},
    "zo_signsgd": {"optimizer.lr": (1e-5, 1e-1), "optimizer.rho": (1e-4, 1e-1)},
    "stp": {"optimizer.lr": (1e-4, 1e-1)},
    "random_search": {"optimizer.lr": (1e-4, 1.0), "optimizer.rho": (1e-4, 1e-1)},
    "sgd": {"optimizer.lr": (1e-4, 1.0)},
    "adamw": {"optimizer.lr": (1e-5, 1e-1)},
}


# Step-size ranges when rho stays at the config's value (compare: one dimension, a log-spaced grid).
STEP_SIZES: dict[str, tuple[str, float, float]] = {
    "vs2p": ("optimizer.eta", 1.0, 300.0),
    "s2p": ("optimizer.lr", 1e-3, 0.3),
    "mezo": ("optimizer.lr", 1e-4, 1.0),
    "zo_sign": ("optimizer.lr", 1e-4, 0.3),
    # every coordinate moves by lr per step, so its scale is a weight's, not a direction's
    "zo_signsgd": ("optimizer.lr", 1e-4, 0.1),
    "stp": ("optimizer.lr", 1e-3, 0.3),
    "random_search": ("optimizer.lr", 1e-4, 1.0),
    "sgd": ("optimizer.lr", 1e-3, 1.0),
    "adamw": ("optimizer.lr", 1e-4, 0.1),
}


def step_size_key(config: RunConfig) -> tuple[str, float, float]:
    """(dotted key, low, high) of the optimizer's one tuned step size (rho unchanged).

    S2P's option 2 scales gamma (eta, MeZO's range); option 4 searches one smoothness scale L
    used for both L0 and L1 (steps |gamma| / (A L + B L |gamma|)).
    """
    name = config.optimizer.name
    if name == "s2p" and config.optimizer.step_size_option == 2:
        return "optimizer.eta", 1e-4, 1.0
    if name == "s2p" and config.optimizer.step_size_option == 4:
        return "optimizer.smooth_l0", 0.3, 300.0
    return STEP_SIZES[name]


def grid_points(key: str, values: list[float]) -> list[dict[str, float]]:
    """Trial overrides of step-size values (option 4's L sets L0 and L1 together, so the saturation moves too)."""
    if key == "optimizer.smooth_l0":
        return [{"optimizer.smooth_l0": v, "optimizer.smooth_l1": v} for v in values]
    return [{key: v} for v in values]


def step_size_grid(config: RunConfig, trials: int) -> list[dict[str, float]]:
    """``trials`` log-spaced step sizes over the optimizer's range (cell midpoints, ``protocol.log_grid``)."""
    key, lo, hi = step_size_key(config)
    return grid_points(key, log_grid(lo, hi, trials))


def passes_per_step(config: RunConfig) -> int:
    """Forward passes (or forward-equivalents) one step costs, for equal-budget comparisons.

    Read off the step rule itself, so it cannot drift from what the driver runs: the
    first round's radii per direction (2 for the two-point rules, ZO-signSGD included,
    3 for STP's f(x), f(x + a z), f(x - a z)), plus 2 when the rule follows up at +-a_k
    (S2P options 2/4 and VS2P without the sign trick), for each of the q directions on
    every replica (each replica probes its group's directions on its own batch, and the
    driver counts every one). A first-order step counts as 3 (a forward and a backward
    of about twice its cost).
    """
    o = config.optimizer
    if o.name in FIRST_ORDER:
        return FIRST_ORDER_PASSES
    from ..zo.rules import build_rule

    rule = build_rule(o, config.steps)
    first = len(rule.radii(rule.init(), 1))
    followup = 2 if getattr(rule, "argmin_followup", False) else 0
    return (first + followup) * o.directions * config.cluster.replicas


def trial_resources(config: RunConfig, driver_cpus: float) -> Any:
    """The trial's bundles: the driver, then one per replica (none when replicas run in-process)."""
    from ray import tune

    from ..distributed.replica import replica_bundle  # the same CPUs, GPUs and memory as a plain run's replicas
    bundles = [{"CPU": driver_cpus}]
    if config.cluster.use_ray:
        bundles += [replica_bundle(config) for _ in range(config.cluster.replicas)]
    return tune.PlacementGroupFactory(bundles)


def _trainable(params: dict[str, Any]) -> None:
    """The Tune function trainable: one ``Driver`` run, resumable from a Tune checkpoint."""
    from ray import tune

    from ..distributed.driver import Driver

    base = RunConfig.from_dict(params["base_config"])
    overrides = dict(params["point"])
    config = base.replace(overrides).replace({"progress": False})
    if not config.cluster.use_ray and not config.cluster.threads_per_replica:
        import ray
        import torch

        # In-process replicas compute in this trial's worker: one thread per CPU the trial reserved.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
    run_dir = Path(tempfile.mkdtemp(prefix="ray_s2p_trial_")) / "run"
    resume = False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            shutil.copytree(saved, run_dir)
        resume = True

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if ckpt_dir is None:
            tune.report(clean)
            return
        with tempfile.TemporaryDirectory() as staging:
            stage = Path(staging)
            for name in ("config.yaml", "ledger.parquet", "metrics.parquet"):
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, stage / name)
            shutil.copytree(ckpt_dir, stage / "checkpoints" / ckpt_dir.name)
            tune.report(clean, checkpoint=tune.Checkpoint.from_directory(staging))

    driver = Driver(config, run_dir, resume=resume, report=report, log=lambda m: None)
    driver.run()
    shutil.rmtree(run_dir.parent, ignore_errors=True)


def run_sweep(base: RunConfig, storage_path: str | Path, *, name: str = "sweep", optimizers: list[str] | None = None,
              trials_per_optimizer: int = 4, budget: int | None = None, metric: str | None = None,
              asha: bool = True, driver_cpus: float = 1.0, max_concurrent: int = 0, restore: bool = False,
              seed: int = 0, step_size_grid_only: bool = False, points: list[dict[str, Any]] | None = None,
              trial_overrides: dict[str, Any] | None = None) -> "SweepResult":
    """Search each optimizer's step sizes with Ray Tune (ASHA by default), on the validation split.

    Args:
        base: the config every trial starts from.
        storage_path: where Tune writes results (local path or a cloud URI).
        optimizers: optimizer names to compare (default: the base config's optimizer only).
        trials_per_optimizer: trials each optimizer gets (equal tuning effort).
        budget: forward passes per trial; steps are set per optimizer so every trial spends the same.
        metric: metric to optimise (default eval_accuracy, max; eval_loss, min if the task has no accuracy).
        asha: use the ASHA scheduler (time attribute: forward_passes).
        driver_cpus: CPUs reserved for each trial's driver bundle.
        restore: resume an interrupted sweep in storage_path/name with Tuner.restore.
        seed: seed of the search's own sampler.
        step_size_grid_only: keep rho and search only the step size on a log-spaced grid
            (``step_size_grid``): with few trials a grid covers the range evenly for every optimizer.
        points: explicit trial overrides, every optimizer runs each of them (``compare``'s grid
            and its extensions); replaces the sampling and ``trials_per_optimizer``.
        trial_overrides: config overrides every trial gets (e.g. ``eval_every``).

    Returns:
        A SweepResult with one row per trial and the best per optimizer.

    Raises:
        ConfigError: the base config evaluates the test split (tuning must read validation only).
    """
    import random

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if base.task.eval_split != "validation":
        raise ConfigError("config field 'task.eval_split': tuning reads the validation split only, got "
                          f"{base.task.eval_split!r}. Fix: leave task.eval_split at validation (compare reports test)")
    optimizers = optimizers or [base.optimizer.name]
    unknown = [o for o in optimizers if o not in SPACES]
    if unknown:
        raise RayS2PError(f"tune: unknown optimizer {unknown[0]!r}. Fix: use some of {', '.join(SPACES)}")
    metric = metric or ("eval_loss" if base.task.name == "causal_lm" else "eval_accuracy")
    mode = "min" if "loss" in metric else "max"
    # The trials are sampled here (seeded) rather than by Tune's sampler, so each optimizer gets exactly
    # trials_per_optimizer configurations and the sweep is reproducible.
    rng = random.Random(seed)
    trials = []
    for opt in optimizers:
        cfg = base.replace({"optimizer.name": opt})
        steps = base.steps if budget is None else max(1, budget // passes_per_step(cfg))
        if points is not None:
            trials += [{"optimizer.name": opt, "steps": steps, **(trial_overrides or {}), **p} for p in points]
            continue
        if step_size_grid_only:
            trials += [{"optimizer.name": opt, "steps": steps, **(trial_overrides or {}), **g}
                       for g in step_size_grid(cfg, trials_per_optimizer)]
            continue
        for _ in range(trials_per_optimizer):
            point = {"optimizer.name": opt, "steps": steps, **(trial_overrides or {})}
            for key, (lo, hi) in SPACES[opt].items():
                point[key] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            trials.append(point)
    trainable = tune.with_resources(_trainable, trial_resources(base, driver_cpus))
    storage = str(Path(storage_path).resolve()) if "://" not in str(storage_path) else str(storage_path)
    path = f"{storage.rstrip('/')}/{name}"
    if restore:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="forward_passes", max_t=max(budget or 0, 10 ** 12), grace_period=1) \
            if asha else None
        tuner = tune.Tuner(
            trainable,
            param_space={"base_config": base.to_dict(), "point": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    results = tuner.fit()
    return SweepResult.from_results(results, metric, mode)


def _trial_params(path: str | None) -> dict[str, Any]:
    """A trial's config from its params.json: a restored experiment gives errored trials no ``config``, and a
    failed grid point must keep its step size (it counts as the worst point, not as a point never run)."""
    import json

    try:
        return json.loads((Path(path) / "params.json").read_text()) if path and "://" not in path else {}
    except (OSError, ValueError):
        return {}


def error_line(error: str) -> str:
    """The one line of an error that says what went wrong: a Ray task error ends with the exception's message."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


class SweepResult:
    """Rows per trial and the best trial per optimizer."""

    def __init__(self, rows: list[dict[str, Any]], metric: str, mode: str) -> None:
        self.rows = rows
        self.metric = metric
        self.mode = mode

    @classmethod
    def from_results(cls, results: Any, metric: str, mode: str) -> "SweepResult":
        rows = []
        for res in results:
            cfg = (res.config or _trial_params(res.path)).get("point", {})
            m = res.metrics or {}
            row = {"optimizer": cfg.get("optimizer.name"), "steps": cfg.get("steps"),
                   "forward_passes": m.get("forward_passes"), metric: m.get(metric), "split": "validation",
                   "eval_loss": m.get("eval_loss"), "error": str(res.error) if res.error else None}
            row.update({k: v for k, v in cfg.items() if k.startswith("optimizer.") and k != "optimizer.name"})
            rows.append(row)
        return cls(rows, metric, mode)

    def failed(self) -> list[dict[str, Any]]:
        """The trials that ended with an error (after Tune's retries)."""
        return [r for r in self.rows if r.get("error")]

    def best(self) -> list[dict[str, Any]]:
        """The best trial of each optimizer (by the sweep's metric)."""
        out: dict[str, dict[str, Any]] = {}
        sign = 1 if self.mode == "max" else -1
        for row in self.rows:
            value = row.get(self.metric)
            if value is None:
                continue
            cur = out.get(row["optimizer"])
            if cur is None or sign * value > sign * cur[self.metric]:
                out[row["optimizer"]] = row
        return sorted(out.values(), key=lambda r: -sign * r[self.metric])

    def write_tables(self, directory: str | Path) -> tuple[Path, Path]:
        """comparison.parquet (all trials) and comparison.md (best per optimizer, validation metric)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ..files import atomic_path, write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in self.rows for k in r})
        table = pa.table({k: [None if r.get(k) is None else str(r.get(k)) if k == "error" else r.get(k)
                              for r in self.rows] for k in keys})
        pq_path = directory / "comparison.parquet"
        with atomic_path(pq_path) as tmp:
            pq.write_table(table, tmp)
        lines = [f"| optimizer | best validation {self.metric} | forward passes | step sizes |", "|---|---|---|---|"]
        for row in self.best():
            sizes = ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" for k, v in sorted(row.items())
                              if k.startswith("optimizer.") and isinstance(v, float))
            lines.append(f"| {row['optimizer']} | {row[self.metric]:.4f} | {row['forward_passes']} | {sizes} |")
        md_path = directory / "comparison.md"
        write_text(md_path, "\n".join(lines) + "\n")
        return pq_path, md_path
