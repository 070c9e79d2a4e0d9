"""The optimizer comparison: equal-budget tuning with Ray Tune, then the best settings over several seeds.

    ray-s2p compare --config jobs/configs/mnist5k_cnn.yaml --budget 4000 --trials 4 --seeds 0,1,2 \
        --target 0.8 --output runs/compare/mnist5k_cnn

1. ``tune.run_sweep`` gives every optimizer the same forward-pass budget and the
   same number of trials: a log-spaced grid over its step size with rho fixed
   (``tune.step_size_grid``); ASHA off so every trial spends the whole budget.
2. The best settings of each optimizer are rerun with every seed.
3. ``results.parquet`` (one row per run), ``summary.md`` (mean +- std of the
   final held-out accuracy and forward passes to reach ``--target``),
   ``tuning.md`` (every tuning trial's step size and result: how sensitive each
   optimizer is to its step size) and ``curves.png`` (held-out accuracy against
   forward passes, mean and range over the seeds; ``compare_plot``) are written
   to ``--output``.
4. Ablations of VS2P (no clipping, a fixed clip threshold, no sign trick, q
   directions per step) are run with VS2P's best settings.

``resume=True`` (``--resume``) continues an interrupted comparison in the same
output directory: finished Tune sweeps are restored instead of rerun, and a
seed run is reused only when its directory holds a finished run (summary.json)
of exactly the config it would run now; anything else is run again.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import RunConfig
from ..files import atomic_path, write_text

ALL_OPTIMIZERS = ["vs2p", "s2p_opt1", "s2p_opt2", "s2p_opt4", "mezo", "zo_sign", "stp", "random_search", "sgd",
                  "adamw"]
# Named variants: optimizer name plus fixed settings.
VARIANTS: dict[str, dict[str, Any]] = {
    "s2p_opt1": {"optimizer.name": "s2p", "optimizer.step_size_option": 1, "optimizer.sign_trick": True},
    "s2p_opt2": {"optimizer.name": "s2p", "optimizer.step_size_option": 2, "optimizer.sign_trick": True},
    "s2p_opt4": {"optimizer.name": "s2p", "optimizer.step_size_option": 4, "optimizer.sign_trick": True},
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "vs2p_no_clip": {"optimizer.clip": "none"},
    "vs2p_fixed_clip": {"optimizer.clip": "fixed"},
    "vs2p_no_sign_trick": {"optimizer.sign_trick": False},
    "vs2p_q4": {"optimizer.directions": 4},
}


def variant_overrides(name: str) -> dict[str, Any]:
    """Config overrides of a named optimizer variant (plain optimizer names map to themselves)."""
    return dict(VARIANTS.get(name, {"optimizer.name": name}))


def forward_passes_to(metrics_path: Path, target: float, metric: str = "eval_accuracy") -> int | None:
    """Forward passes at the first evaluation reaching ``target`` (None if never)."""
    rows = pq.read_table(metrics_path).to_pylist()
    for r in rows:
        if r["kind"] == "eval" and r.get(metric) is not None and r[metric] >= target:
            return int(r["forward_passes"] or 0)
    return None


def tune_variant(base: RunConfig, name: str, storage: Path, trials: int, budget: int, seed: int,
                 resume: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best step sizes of one variant from an equal-budget Tune sweep (restored when ``resume`` finds it).

    Returns:
        The best trial's overrides (with its step count), and one row per trial: the
        variant, its step-size settings, and the final held-out metric (None if it failed).
    """
    from .tune import run_sweep

    fixed = variant_overrides(name)
    cfg = base.replace(fixed)
    restore = resume and (storage / f"tune-{name}").is_dir()
    result = run_sweep(cfg, storage, name=f"tune-{name}", optimizers=[fixed["optimizer.name"]],
                       trials_per_optimizer=trials, budget=budget, asha=False, driver_cpus=1.0, seed=seed,
                       step_size_grid_only=True, restore=restore)
    best = result.best()
    if not best:
        raise RuntimeError(f"compare: every tuning trial of {name} failed: {[r.get('error') for r in result.rows]}")
    tuned = {k: v for k, v in best[0].items() if k.startswith("optimizer.") and k != "optimizer.name"}
    trial_rows = [{"variant": name, "metric": result.metric, "value": r.get(result.metric),
                   "settings": {k: v for k, v in r.items() if k.startswith("optimizer.") and k != "optimizer.name"
                                and isinstance(v, float)}} for r in result.rows]
    return fixed | tuned | {"steps": best[0]["steps"]}, trial_rows


def tuning_summary(trial_rows: list[dict[str, Any]]) -> str:
    """Markdown: every tuning trial's step size and final held-out metric, per variant (grid order)."""
    lines = ["| optimizer | step size | final held-out metric at each grid point |", "|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in trial_rows):
        runs = sorted((r for r in trial_rows if r["variant"] == name),
                      key=lambda r: tuple(sorted(r["settings"].items())))
        keys = sorted({k.split(".", 1)[1] for r in runs for k in r["settings"]})
        points = ", ".join(
            f"{'/'.join(f'{v:.3g}' for _, v in sorted(r['settings'].items()))}: "
            f"{'failed' if r['value'] is None else format(r['value'], '.3f')}" for r in runs)
        lines.append(f"| {name} | {'/'.join(keys)} | {points} |")
    return "\n".join(lines) + "\n"


def finished_run(run_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly ``config`` in ``run_dir``, else None."""
    import yaml

    try:
        stored = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # absent, unreadable, or a config this version rejects
        return None
    if stored != config or summary.get("steps_completed") != config.steps:
        return None
    return summary


def run_seeds(base: RunConfig, name: str, overrides: dict[str, Any], seeds: list[int], out: Path,
              target: float, resume: bool = False) -> list[dict[str, Any]]:
    """Train the tuned variant once per seed (reusing finished identical runs when ``resume``); one row per run."""
    from ..distributed.driver import train

    rows = []
    for seed in seeds:
        cfg = base.replace(overrides | {"seed": seed, "progress": False})
        run_dir = out / "runs" / f"{name}-seed{seed}"
        summary = finished_run(run_dir, cfg) if resume else None
        if summary is None:
            summary = train(cfg, run_dir, overwrite=True, log=lambda m: None).summary
        final = summary["final_metrics"]
        rows.append({"variant": name, "seed": seed, "final_accuracy": final.get("eval_accuracy"),
                     "final_loss": final.get("eval_loss"), "forward_passes": summary["forward_passes"],
                     "passes_to_target": forward_passes_to(run_dir / "metrics.parquet", target),
                     "wall_seconds": summary["wall_seconds"], "run_dir": str(run_dir),
                     "settings": ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else
                                           f"{k.split('.', 1)[1]}={v}" for k, v in sorted(overrides.items())
                                           if k.startswith("optimizer."))})
    return rows


def summarise(rows: list[dict[str, Any]], target: float) -> str:
    """Markdown table: mean +- std of final accuracy, forward passes to the target (runs that reached it)."""
    lines = [f"| optimizer | final accuracy (mean +- std) | forward passes to {target:.0%} | tuned settings |",
             "|---|---|---|---|"]
    order: list[str] = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    for name in order:
        runs = [r for r in rows if r["variant"] == name]
        accs = [r["final_accuracy"] for r in runs if r["final_accuracy"] is not None]
        mean = statistics.fmean(accs) if accs else math.nan
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        reached = [r["passes_to_target"] for r in runs if r["passes_to_target"] is not None]
        passes = (f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(runs)} runs)" if reached
                  else f"not reached (0/{len(runs)})")
        lines.append(f"| {name} | {mean:.4f} +- {std:.4f} | {passes} | {runs[0]['settings']} |")
    return "\n".join(lines) + "\n"


def compare(base: RunConfig, output: str | Path, *, variants: list[str], budget: int, trials: int,
            seeds: list[int], target: float, ablations: bool = True, tune_seed: int = 0,
            resume: bool = False) -> list[dict[str, Any]]:
    """Tune every variant with equal effort and budget, rerun the best over seeds, write the tables and plot."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tuned: dict[str, dict[str, Any]] = {}
    trial_rows: list[dict[str, Any]] = []
    for name in variants:
        tuned[name], trials_of_name = tune_variant(base, name, out / "tune", trials, budget, tune_seed, resume)
        trial_rows += trials_of_name
        write_text(out / "tuning.md", tuning_summary(trial_rows))
        rows += run_seeds(base, name, tuned[name], seeds, out, target, resume)
        _write(out, rows, target)
    if ablations and "vs2p" in tuned:
        from .tune import passes_per_step
        for name, change in ABLATIONS.items():
            cfg = base.replace(tuned["vs2p"] | change)
            steps = max(1, budget // passes_per_step(cfg))
            rows += run_seeds(base, name, tuned["vs2p"] | change | {"steps": steps}, seeds, out, target, resume)
            _write(out, rows, target)
    _plot(out, rows, target)
    return rows


def _write(out: Path, rows: list[dict[str, Any]], target: float) -> None:
    keys = sorted({k for r in rows for k in r})
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    with atomic_path(out / "results.parquet") as tmp:
        pq.write_table(table, tmp)
    write_text(out / "summary.md", summarise(rows, target))


def _plot(out: Path, rows: list[dict[str, Any]], target: float) -> None:
    from ..plots.comparison import plot_comparison
    plot_comparison(rows, out / "curves.png", target=target, ablation_names=list(ABLATIONS))
