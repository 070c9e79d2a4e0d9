"""The optimizer comparison: equal-budget tuning on validation, then the best settings over seeds on test.

    ray-s2p compare --config jobs/configs/mnist5k_cnn.yaml --set task.test_size=1000 --budget 40000 \
        --trials 5 --seeds 0,1,2,3,4 --target 0.8 --output runs/compare/mnist5k_cnn

The protocol (every choice that could favour a rule is the same for all of them):

1. Data: one fixed train / validation / test split of the task (``task.split_seed``,
   never the run seed); ``task.test_size`` must be set. Tuning reads validation only,
   the reruns evaluate test only.
2. Tuning (``tune_variant``): every optimizer gets the same forward-pass budget and a
   log-spaced grid of ``trials`` (>= 5) step sizes with rho fixed, one Ray Tune trial
   each (ASHA off, so every trial spends the whole budget), seed ``tune_seed``. When
   the best point is strictly best and on an edge of the grid, two more points are
   run on that side, up to twice (``protocol``); tuning.md says so.
3. Reruns (``reruns.run_seeds``): the best settings with every seed, evaluated on test every
   ``eval_interval`` forward passes, the same pass counts for every optimizer (>= 25
   points per curve); passes to ``target`` are interpolated between evaluations.
4. Ablations of VS2P (no clipping, a fixed clip threshold, no sign trick, q
   directions per step) with VS2P's tuned settings.
5. ``results.parquet`` (one row per run), ``tuning.parquet`` and ``tuning.md`` (every
   trial), ``summary.md`` (mean, standard deviation and paired comparisons of VS2P
   against each other variant; ``report.py``) and ``curves.png``.

``zo_sign`` is S2P option 1 with the sign trick and ``s2p_opt2`` is MeZO (same
coefficients, same grid), so the default list names each rule once (``ALIASES``); with one
direction per step random search is option 1 at twice the lr and is left out too
(``default_variants``).

``resume=True`` (``--resume``) continues an interrupted comparison in the same
output directory: finished Tune sweeps are restored instead of rerun, and a
seed run is reused only when its directory holds a finished run (summary.json)
of exactly the config it would run now; anything else is run again.

``train=False`` (``--report-only``) trains nothing: it writes the reports from what the
progress file (and, for reruns, finished run directories) holds, and lists every rule it
could not report because a sweep or a run of it is not recorded (``Comparison.missing``).

Failures do not stop a comparison: a failed trial counts as the worst grid point, a
variant whose every trial failed is not rerun, a failed rerun is a row with its
error; ``Comparison.failures`` lists them all (the CLI exits non-zero on any).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError, RunConfig
from ..config_history import trajectory_dict
from ..files import atomic_path, write_text
from .progress import FILE_NAME as PROGRESS_FILE
from .progress import CompareProgress, NotRecorded, fingerprint
from .protocol import (
    MAX_EXTENSIONS,
    MIN_EVAL_POINTS,
    Tuned,
    best_index,
    edge_side,
    eval_interval,
    extension,
    log_grid,
    refinement,
)
from .report import summarise, tuning_summary
from .reruns import run_seeds

ALL_OPTIMIZERS = ["vs2p", "s2p_opt1", "s2p_opt4", "mezo", "zo_signsgd", "stp", "random_search", "sgd", "adamw"]
# Names of a rule the list already holds under another name: accepted by --optimizers, never listed by default.
ALIASES = {"zo_sign": "s2p_opt1", "s2p_opt3": "s2p_opt1", "s2p_opt2": "mezo"}
# Named variants: optimizer name plus fixed settings.
VARIANTS: dict[str, dict[str, Any]] = {
    "s2p_opt1": {"optimizer.name": "s2p", "optimizer.step_size_option": 1, "optimizer.sign_trick": True},
    "s2p_opt2": {"optimizer.name": "s2p", "optimizer.step_size_option": 2, "optimizer.sign_trick": True},
    "s2p_opt3": {"optimizer.name": "s2p", "optimizer.step_size_option": 3, "optimizer.sign_trick": True},
    "s2p_opt4": {"optimizer.name": "s2p", "optimizer.step_size_option": 4, "optimizer.sign_trick": True},
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "vs2p_no_clip": {"optimizer.clip": "none"},
    "vs2p_fixed_clip": {"optimizer.clip": "fixed"},
    "vs2p_no_sign_trick": {"optimizer.sign_trick": False},
    "vs2p_q4": {"optimizer.directions": 4},
}


def default_variants(base: RunConfig) -> tuple[list[str], str | None]:
    """The rules a comparison of ``base`` lists when none are named, and why one was left out (or None).

    With one direction per step (``top_b`` keeps it either way) random search's sigma_R is |f+ - f-| / 2, so its
    update is -2 lr sign(gamma) z: S2P option 1 with the sign trick at twice the lr. Listed once, as
    ``s2p_opt1``; naming ``random_search`` in ``--optimizers`` still runs it.
    """
    if base.optimizer.directions * base.cluster.replicas == 1:
        return ([n for n in ALL_OPTIMIZERS if n != "random_search"],
                "random_search with one direction per step is s2p_opt1 at twice the lr: listed once, as s2p_opt1")
    return list(ALL_OPTIMIZERS), None


def variant_overrides(name: str) -> dict[str, Any]:
    """Config overrides of a named optimizer variant (plain optimizer names map to themselves)."""
    return dict(VARIANTS.get(name, {"optimizer.name": name}))


@dataclass
class Comparison:
    """What ``compare`` did: one row per rerun, every tuning trial, and every failure (one line each)."""

    rows: list[dict[str, Any]]
    tuned: list[Tuned]
    failures: list[str]
    missing: list[str] = field(default_factory=list)  # with train=False: what is not recorded, one line each


def tune_variant(base: RunConfig, name: str, storage: Path, trials: int, budget: int, seed: int,
                 resume: bool = False, trial_cpus: float = 1.0, progress: CompareProgress | None = None,
                 train: bool = True, step_range: tuple[float, float] | None = None) -> Tuned:
    """Best step size of one variant on the validation split, from a log-spaced grid extended at its edge
    and then refined once around its best point (``protocol.refinement``).

    Args:
        base: the task config (its ``task.eval_split`` must be validation).
        name: the variant (an optimizer name or a ``VARIANTS`` key).
        storage: where the Tune sweeps go (``tune-NAME``, then ``tune-NAME-ext1``, ...).
        trials: grid points before any extension.
        budget: forward passes per trial.
        seed: the trials' run seed.
        resume: restore sweeps that already exist in ``storage``.
        trial_cpus: CPUs each trial reserves (its in-process replicas run with that many threads).
        progress: finished sweeps are recorded there and, when ``resume``, taken from there.
        train: False: take every sweep from ``progress`` (``resume`` is implied).
        step_range: (low, high) of the first grid instead of the rule's default range (``STEP_SIZES``):
            a task whose step sizes sit far from the defaults (a 7 M-parameter LM block against a
            148 k-parameter head) would otherwise spend its edge extensions walking there.

    Raises:
        NotRecorded: ``train`` is False and a sweep is not in ``progress``.
    """
    from .tune import grid_points, passes_per_step, run_sweep, step_size_key

    fixed = variant_overrides(name)
    cfg = base.replace(fixed | {"seed": seed})
    key, low, high = step_size_key(cfg)
    if step_range is not None:
        low, high = step_range
    results: dict[float, dict[str, Any]] = {}
    metric, mode = "eval_accuracy", "max"

    def sweep(values: list[float], label: str, round_: int) -> None:
        nonlocal metric, mode
        # Trials evaluate once, at the end: tuning reads only the final validation metric. They report to
        # Tune once too: each report waits for Tune's controller, which made a CNN trial 3x slower.
        points, overrides = grid_points(key, values), {"eval_every": 0, "log_every": trial_steps}
        inputs = fingerprint({"config": trajectory_dict(cfg), "points": points, "budget": budget, "trials": overrides})
        done = progress.sweep(label, inputs) if progress is not None and (resume or not train) else None
        if done is None and not train:
            raise NotRecorded(f"{name}: sweep {label} not recorded")
        if done is None:
            restore = resume and (storage / label).is_dir()
            result = run_sweep(cfg, storage, name=label, optimizers=[fixed["optimizer.name"]], budget=budget,
                               asha=False, driver_cpus=trial_cpus, seed=seed, points=points,
                               trial_overrides=overrides, restore=restore)
            # Failed trials are kept with their error: they failed after Tune's retries (a diverging step
            # size, most often), count as the worst point, and would fail the same way on another machine.
            if progress is not None:
                progress.record_sweep(label, inputs, result.metric, result.mode, result.rows)
            done = {"metric": result.metric, "mode": result.mode, "rows": result.rows}
        metric, mode = done["metric"], done["mode"]
        for row in done["rows"]:
            value = row.get(key)
            if value is not None:
                results[float(value)] = dict(row, round=round_)

    trial_steps = max(1, budget // passes_per_step(cfg))
    sweep(log_grid(low, high, trials), f"tune-{name}", 0)
    grid = sorted(results)
    extensions: list[str] = []
    while len(extensions) < MAX_EXTENSIONS:
        side = edge_side([results[v].get(metric) for v in grid], mode)
        if side is None:
            break
        extensions.append(side)
        sweep(extension(grid, side), f"tune-{name}-ext{len(extensions)}", len(extensions))
        grid = sorted(results)
    refined = 0
    best = best_index([results[v].get(metric) for v in grid], mode)
    if best is not None and len(grid) > 1:
        # Every rule gets the same refinement: its grid's density depends on how wide a range we chose for it.
        points = refinement(grid, best)
        sweep(points, f"tune-{name}-refine", len(extensions) + 1)
        refined = len(points)
        grid = sorted(results)
    values = [results[v].get(metric) for v in grid]
    best = best_index(values, mode)
    trial_rows = [{"variant": name, "key": key.split(".", 1)[1], "step_size": v, "metric": metric,
                   "split": "validation", "value": results[v].get(metric), "round": results[v]["round"],
                   "error": results[v].get("error")} for v in grid]
    if best is None:
        return Tuned(name, None, trial_rows, len(grid), extensions, refined=refined)
    chosen = grid_points(key, [grid[best]])[0]
    overrides = fixed | chosen | {"steps": results[grid[best]]["steps"]}
    return Tuned(name, overrides, trial_rows, len(grid), extensions, edge_side(values, mode), refined)


def check_base(base: RunConfig) -> tuple[RunConfig, RunConfig]:
    """(tuning config on validation, rerun config on test) of a comparison's base config.

    Raises:
        ValueError: the task has no test split.
    """
    if base.task.test_size == 0:
        raise ConfigError("compare reports the test split, and task.test_size is 0. Fix: set task.test_size "
                         "(e.g. --set task.test_size=1000); tuning reads the task.eval_size validation rows")
    return base.replace({"task.eval_split": "validation"}), base.replace({"task.eval_split": "test"})


def compare(base: RunConfig, output: str | Path, *, variants: list[str], budget: int, trials: int,
            seeds: list[int], target: float, ablations: bool = True, tune_seed: int = 0,
            resume: bool = False, eval_points: int = MIN_EVAL_POINTS, parallel_runs: int = 1,
            trial_cpus: float = 1.0, progress: str | Path | None = None, train: bool = True,
            step_ranges: dict[str, tuple[float, float]] | None = None) -> Comparison:
    """Tune every variant with equal effort and budget on validation, rerun the best over seeds on test, report.

    ``parallel_runs``: reruns (seeds) trained at once, each a one-CPU Ray task; 1 trains them in this process.
    ``trial_cpus``: CPUs each tuning trial reserves (Ray runs as many trials at once as fit).
    ``progress``: the progress file (default ``OUTPUT/progress.json``, ``progress.py``): every finished
    sweep and run is recorded there, and with ``resume`` taken from there when its inputs are the same.
    ``train``: False writes the reports from what is recorded and trains nothing; a rule with a sweep or
    run not recorded is left out of them and named in ``Comparison.missing``.
    ``step_ranges``: variant -> (low, high) of its first grid (``tune_variant``'s ``step_range``).

    Raises:
        ValueError: the task has no test split, or the progress file is unreadable.
    """
    from .tune import passes_per_step

    tuning_base, test_base = check_base(base)
    out = Path(output)
    record = CompareProgress.load(progress if progress is not None else out / PROGRESS_FILE)  # before writing anything
    out.mkdir(parents=True, exist_ok=True)
    costs = [passes_per_step(base.replace(variant_overrides(n))) for n in variants]
    if ablations and "vs2p" in variants:
        costs += [passes_per_step(base.replace({"optimizer.name": "vs2p"} | c)) for c in ABLATIONS.values()]
    interval = eval_interval(budget, costs, eval_points)
    rows: list[dict[str, Any]] = []
    tuned: list[Tuned] = []
    missing: list[str] = []
    for name in variants:
        try:
            tuned.append(tune_variant(tuning_base, name, out / "tune", trials, budget, tune_seed, resume,
                                      trial_cpus, record, train, (step_ranges or {}).get(name)))
            _write_tuning(out, tuned, trials)
            if tuned[-1].overrides is not None:
                rows += run_seeds(test_base, name, tuned[-1].overrides, seeds, out, target, interval, resume,
                                  parallel_runs, record, train)
        except NotRecorded as exc:  # only without training: the rule's tuning is reported if it is recorded
            missing.append(str(exc))
            continue
        _write(out, rows, tuned, target, interval, budget)
    vs2p = next((t.overrides for t in tuned if t.name == "vs2p"), None)
    if ablations and vs2p is not None:
        for name, change in ABLATIONS.items():
            steps = max(1, budget // passes_per_step(base.replace(vs2p | change)))
            try:
                rows += run_seeds(test_base, name, vs2p | change | {"steps": steps}, seeds, out, target, interval,
                                  resume, parallel_runs, record, train)
            except NotRecorded as exc:
                missing.append(str(exc))
                continue
            _write(out, rows, tuned, target, interval, budget)
    return Comparison(rows, tuned, failures(tuned, rows), missing)


def failures(tuned: list[Tuned], rows: list[dict[str, Any]]) -> list[str]:
    """One line per failed tuning trial, variant left without settings, and failed rerun."""
    from .tune import error_line

    out = [f"tuning {t['variant']} {t['key']}={t['step_size']:.3g}: {error_line(t['error'])}"
           for tn in tuned for t in tn.trials if t.get("error")]
    out += [f"{tn.name}: every tuning trial failed, not rerun" for tn in tuned if tn.overrides is None]
    out += [f"run {r['variant']} seed {r['seed']}: {r['error']}" for r in rows if r.get("error")]
    return out


def _write_tuning(out: Path, tuned: list[Tuned], trials: int) -> None:
    rows = [t for tn in tuned for t in tn.trials]
    keys = sorted({k for r in rows for k in r})
    with atomic_path(out / "tuning.parquet") as tmp:
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), tmp)
    write_text(out / "tuning.md", tuning_summary(tuned, trials))


def _write(out: Path, rows: list[dict[str, Any]], tuned: list[Tuned], target: float, interval: int,
           budget: int) -> None:
    keys = sorted({k for r in rows for k in r} - {"curve"})  # the curves are in the runs' metrics and progress.json
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    with atomic_path(out / "results.parquet") as tmp:
        pq.write_table(table, tmp)
    write_text(out / "summary.md", summarise(rows, tuned, target, interval, budget))
    # Drawn after every rule, so a comparison run in parts has its curves so far.
    if any(r.get("test_accuracy") is not None for r in rows):
        _plot(out, [r for r in rows if r.get("error") is None], target)


def _plot(out: Path, rows: list[dict[str, Any]], target: float) -> None:
    from ..plots.comparison import plot_comparison
    plot_comparison(rows, out / "curves.png", target=target, ablation_names=list(ABLATIONS),
                    ylabel="test accuracy")
