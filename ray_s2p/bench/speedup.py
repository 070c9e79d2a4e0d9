"""``ray-s2p bench speedup``: steps to a target accuracy S(Q) against the directions per step Q.

Q direction-mode replicas with one direction each compute bit for bit what one in-process replica
with ``optimizer.directions = Q`` computes, so every run is the latter (``FIXED``). Per task (``PRESETS``):

- one forward-pass budget P for every Q: the run with Q directions gets B(Q) = ceil(P / passes per
  step) steps (2 Q for the two-point rules), evaluated about ``EVALS_PER_RUN`` times
  (``eval_every = max(1, B(Q) // 25)``);
- the step size is the preset's Q = 1 value (eta_1 or lr_1, the key ``sweeps/tune.py``
  ``step_size_key`` names) times a multiplier m, with ``optimizer.step_scaling: linear`` and
  ``optimizer.tuned_directions: 1``, so m = 1 is the untuned default at every Q;
- phase ``tune``: m in ``MULTIPLIERS`` on the validation split, seed ``TUNE_SEED``; the pick is the m
  with the fewest steps to the target, else the best final validation accuracy (speedup_fit.py);
- phase ``default``: m = 1 on the test split, seeds ``SEEDS``; phase ``tuned``: the pick, the same
  seeds (the same runs when the pick is m = 1).

Every finished run is recorded at once in a JSON progress file (``SpeedupProgress``) under (task, Q, m,
seed, split) and a fingerprint of its config dict: its evaluation curve (step, forward passes, wall
seconds, accuracy) and final numbers. ``--resume`` skips every run recorded with the fingerprint it would
have now (a changed preset, budget or --set reruns). S(Q) is computed from the curves at every summary,
with the preset's current target. Run directories are removed once recorded unless ``--keep-runs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, load_config
from ..errors import RayS2PError
from ..sweeps.tune import grid_points, passes_per_step, step_size_key
from .common import log as log_line
from .common import machine_info
from .speedup_fit import group, run_steps, summarise_task
from .speedup_report import compact_summary, pilot_lines, run_line, write_report
from .speedup_runs import SpeedupProgress, run_fingerprint, run_key, train_run

REPO = Path(__file__).resolve().parents[2]
Q_VALUES = (1, 2, 4, 8, 16, 32, 64)
MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
SEEDS = (0, 1, 2)
TUNE_SEED = 0
EVALS_PER_RUN = 25
PHASES = ("tune", "default", "tuned")
# Only when named: "data" trains Q = 1 on an N-fold batch (what N data-mode replicas with weak batch
# scaling compute) for every N > 1 of --q; "wall" times Ray replicas and needs a quiet machine.
NAMED_PHASES = ("data", "wall")
WALL_RAY_STEPS = 200     # steps of each timed Ray run (1 and 2 replicas), timed over the last quarter
WALL_TIME_REPEATS = 3    # 1 against 2 Ray replicas to the target, alternating, seeds 0, 1, 2
DEFAULT_PROGRESS = "docs/results/progress/speedup.json"
DEFAULT_OUTPUT = "runs/speedup"
DEFAULT_REPORT = "docs/results/speedup.md"

# What every run fixes, over the preset and --set: one in-process replica evaluating Q directions (what
# Q direction-mode replicas compute), no periodic checkpoint or digest (one replica, nothing to compare),
# and the step scaling that makes m = 1 the untuned default at every Q.
FIXED: dict[str, Any] = {"cluster.use_ray": False, "cluster.replicas": 1, "cluster.mode": "direction",
                         "checkpoint_every": 0, "progress": False, "tensorboard": False, "cluster.digest_every": 0,
                         "optimizer.step_scaling": "linear", "optimizer.tuned_directions": 1}
# Keys the protocol sets per run; a --set of them would be silently replaced, so it is refused.
PROTOCOL_KEYS = {"steps", "eval_every", "log_every", "seed", "optimizer.directions", "task.eval_split"}


@dataclass(frozen=True)
class Preset:
    """One task: ``config_file`` (relative to the repository root) with ``overrides`` (the user's --set wins
    over them, ``FIXED`` over both); ``step_size`` eta_1 or lr_1 (the value at Q = 1 of the key
    ``step_size_key`` names); ``budget`` P, forward passes per run at every Q; ``target`` the accuracy S(Q)
    counts steps to (None until set from the Q = 1 pilot); ``about`` one line for the report."""

    config_file: str
    overrides: dict[str, Any]
    step_size: float
    budget: int
    target: float | None
    about: str


RT_DATA = {"task.train_size": 2048, "task.eval_size": 500, "task.test_size": 1000,
           "task.options.feature_cache_mb": 1024}
# P (forward passes per run) and the target accuracy of each measured task, fixed from runs at Q = 1
# before any measured run (`--pilot`; docs/benchmarks.md gives the pilots): a target that Q = 1 reaches
# at about half of P, so that a Q with half its per-direction efficiency still reaches it.
# rt_head: a Q = 1 run of 20,000 passes (validation) crossed 0.64 at 11,200 passes and ended at 0.67.
# mnist_cnn: (a)'s five test curves at eta 9.79 crossed 0.30 between 9,500 and 14,300 passes.
# minilm_top: a Q = 1 run (eta 10, validation) read 0.626 at 1,000 passes, 0.64 at 1,500 and 0.654 at 2,500.
BUDGETS = {"rt_head": 30_000, "mnist_cnn": 24_000, "minilm_top": 4_000, "tiny": 160}
TARGETS: dict[str, float | None] = {"rt_head": 0.64, "mnist_cnn": 0.30, "minilm_top": 0.64, "tiny": 0.9}

PRESETS: dict[str, Preset] = {
    # (c) of docs/benchmarks.md: pooler + head (148 k parameters) on cached features, low-rank
    # directions; eta 5.54 is VS2P's tuned value there at one direction per step.
    "rt_head": Preset("jobs/configs/default.yaml", {**RT_DATA, "perturbation.distribution": "lowrank"},
                      5.54, BUDGETS["rt_head"], TARGETS["rt_head"],
                      "MiniLM pooler + head on Rotten Tomatoes, cached features, low-rank directions (rank 2)"),
    # (a): the width-16 CNN (14 k parameters), Gaussian directions; eta 9.79 is VS2P's tuned value there.
    "mnist_cnn": Preset("jobs/configs/mnist5k_cnn.yaml",
                        {"task.tiny_width": 16, "task.eval_size": 500, "task.test_size": 1000,
                         "perturbation.distribution": "gaussian"},
                        9.79, BUDGETS["mnist_cnn"], TARGETS["mnist_cnn"],
                        "MNIST-5k, CNN of width 16, Gaussian directions"),
    # The top encoder layer, pooler and head (1,923,074 parameters) move; the five frozen layers below run
    # once per example (feature reuse). Low-rank directions: at Q = 1 (validation, seed 0) Gaussian ones at
    # eta 0.43, 1.5, 5.54 and 22 stayed within 0.50-0.60 of the start's 0.576 over 1,500 steps at about
    # 0.16 s a step; low-rank ones at eta 10 reached 0.64 within 750 steps at about 0.07 s a step.
    "minilm_top": Preset("jobs/configs/default.yaml",
                         {**RT_DATA, "task.trainable": "top_k", "task.top_k": 1, "task.feature_reuse": True,
                          "perturbation.distribution": "lowrank"},
                         10.0, BUDGETS["minilm_top"], TARGETS["minilm_top"],
                         "MiniLM top encoder layer + pooler + head on Rotten Tomatoes, low-rank directions (rank 2)"),
    # The smoke preset (tests, a first try): a synthetic task, a few seconds per run.
    "tiny": Preset("jobs/configs/smoke.yaml", {"task.eval_size": 128, "task.test_size": 128}, 2.0,
                   BUDGETS["tiny"], TARGETS["tiny"], "synthetic blobs, 2-layer MLP (smoke preset)"),
}
MEASURED = ("rt_head", "mnist_cnn", "minilm_top")


@dataclass
class SpeedupOptions:
    """What one ``ray-s2p bench speedup`` call runs (the CLI's options)."""

    tasks: tuple[str, ...] = MEASURED
    q: tuple[int, ...] = Q_VALUES
    phase: str = "all"
    progress: str = DEFAULT_PROGRESS
    output: str = DEFAULT_OUTPUT
    report: str = DEFAULT_REPORT
    resume: bool = False
    report_only: bool = False
    pilot: bool = False
    budget: int | None = None
    keep_runs: bool = False


@dataclass
class Speedup:
    """Runs a part of the benchmark (``options``; ``sets``: the user's --set, over every preset) and
    summarises what is recorded; progress lines go to ``log``."""

    options: SpeedupOptions
    sets: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = log_line
    trained: int = 0
    reused: int = 0

    def __post_init__(self) -> None:
        refused = sorted(k for k in self.sets if k in PROTOCOL_KEYS or k in FIXED)
        if refused:
            raise RayS2PError(f"--set {refused[0]}: the speedup benchmark sets this key itself for every run. "
                             f"Fix: leave it out (budget: --budget; Q: --q)")
        self.progress = SpeedupProgress.load(self.options.progress)
        self._bases: dict[str, RunConfig] = {}
        self._done_now: set[str] = set()

    # ------------------------------------------------------------ configs
    def base(self, task: str) -> RunConfig:
        """The preset's config with --set and ``FIXED`` (cached)."""
        if task not in self._bases:
            preset = PRESETS[task]
            path = Path(preset.config_file)
            path = path if path.is_absolute() or path.is_file() else REPO / path
            if not path.is_file():
                raise RayS2PError(f"speedup preset {task}: config {preset.config_file!r} not found under "
                                        f"{REPO}. Fix: run from a checkout of the repository")
            base = load_config(path).replace({**preset.overrides, **self.sets, **FIXED})
            key = step_size_key(base)[0]
            if key in self.sets:
                raise RayS2PError(f"--set {key}: the step size of preset {task} is its eta_1/lr_1 times the tuning "
                                 f"multiplier. Fix: change the preset's step_size instead")
            self._bases[task] = base
        return self._bases[task]

    def budget(self, task: str) -> int:
        return self.options.budget if self.options.budget is not None else PRESETS[task].budget

    def config(self, task: str, q: int, m: float, seed: int, split: str, shards: int = 1) -> RunConfig:
        """The run's config: B(Q) = ceil(P / passes per step) steps, ~25 evaluations, eta_1 * m; with
        ``shards`` > 1 the batch is ``shards`` times the preset's (weak data mode; the steps of Q = 1)."""
        base = self.base(task)
        if shards > 1:
            base = base.replace({"task.batch_size": base.task.batch_size * shards})
        key = step_size_key(base)[0]
        value = PRESETS[task].step_size * m
        if key == "optimizer.smooth_l0":  # S2P option 4's step falls with its smoothness L: m divides L
            value = PRESETS[task].step_size / m
        cfg = base.replace({**grid_points(key, [value])[0], "optimizer.directions": q, "seed": seed,
                            "task.eval_split": split})
        steps = max(1, math.ceil(self.budget(task) / passes_per_step(cfg)))
        every = max(1, steps // EVALS_PER_RUN)
        return cfg.replace({"steps": steps, "eval_every": every, "log_every": every})

    # ------------------------------------------------------------ runs
    def ensure(self, task: str, q: int, m: float, seed: int, split: str, shards: int = 1) -> dict[str, Any]:
        """The recorded run (reused under --resume, or once trained in this call), else train and record it."""
        cfg = self.config(task, q, m, seed, split, shards)
        key, fp = run_key(task, q, m, seed, split, shards), run_fingerprint(cfg)
        entry = self.progress.get(key, fp)
        if entry is not None and (self.options.resume or key in self._done_now):
            self.reused += 1
            return entry
        run_dir = Path(self.options.output) / task / key.split("/", 1)[1].replace("/", "-")
        entry = train_run(cfg, run_dir, keep=self.options.keep_runs)
        size_key = step_size_key(cfg)[0]
        entry.update(fingerprint=fp, task=task, q=q, m=m, seed=seed, split=split, budget=self.budget(task), shards=shards,
                     step_size_key=size_key, step_size=getattr(cfg.optimizer, size_key.split(".", 1)[1]))
        self.progress.record(key, entry)
        self._done_now.add(key)
        self.trained += 1
        self.log(run_line(entry, run_steps(entry, PRESETS[task].target)))
        return entry

    def run_part(self) -> None:
        """Train what ``options`` selects (pilot: Q = 1, m = 1, seed 0 on validation, with its curve printed).

        Raises:
            ValueError: a measured phase of a task whose target is not set.
        """
        opts = self.options
        phases = PHASES if opts.phase == "all" else (opts.phase,)
        if "wall" in phases:
            for task in opts.tasks:
                self.wall(task)
            return
        for task in opts.tasks:
            target = PRESETS[task].target
            if opts.pilot:
                self.log(pilot_lines(task, self.ensure(task, 1, 1.0, TUNE_SEED, "validation"), target, TUNE_SEED))
                continue
            if target is None:
                raise RayS2PError(f"speedup preset {task}: no target accuracy set. Fix: run `ray-s2p bench speedup "
                                 f"--pilot --tasks {task}` and set TARGETS[{task!r}] in ray_s2p/bench/speedup.py "
                                 f"before any measured run")
            for q in opts.q:
                if "tune" in phases:
                    for m in MULTIPLIERS:
                        self.ensure(task, q, m, TUNE_SEED, "validation")
                if "default" in phases:
                    for seed in SEEDS:
                        self.ensure(task, q, 1.0, seed, "test")
                if "tuned" in phases:
                    m = self.pick(task, q, self.table(task, [q])[0])
                    if m is None:
                        self.log(f"speedup {task} Q={q}: tuned phase skipped, the tuning runs are not all "
                                 f"recorded. Fix: run --phase tune --q {q} first")
                        continue
                    for seed in SEEDS:
                        self.ensure(task, q, m, seed, "test")
                if "data" in phases and q > 1:
                    for seed in SEEDS:
                        self.ensure(task, 1, 1.0, seed, "test", shards=q)

    def wall(self, task: str) -> dict[str, Any]:
        """The wall-clock side of ``task`` (speedup_wall.py) from its recorded S(Q), recorded under
        ``TASK/wall``: Ray step times, T_p and u(N), the model, the projection, 1 against 2 Ray replicas."""
        from .speedup_wall import measure_task

        summary = self.summaries(tasks=(task,))[task]
        s_of_q = {r["q"]: r["default"]["S_mean"] for r in summary["rows"] if r["default"]["complete"]}
        cfg = self.config(task, 1, 1.0, TUNE_SEED, "validation")
        self.log(f"speedup {task}: wall clock (S(Q) of {sorted(s_of_q)})")
        shards = tuple(n for n in self.options.q if n > 1 and cfg.task.batch_size % n == 0)
        result = measure_task(cfg, s_of_q, PRESETS[task].target, ray_steps=WALL_RAY_STEPS, repeats=5,
                              shards=shards, time_repeats=WALL_TIME_REPEATS, log=self.log)
        entry = json.loads(json.dumps({**result, "s_of_q": s_of_q, "machine": machine_info()}, default=float))
        self.progress.record(f"{task}/wall", {**entry, "fingerprint": run_fingerprint(cfg)})
        self.trained += 1
        return entry

    # ------------------------------------------------------------ what is recorded
    def table(self, task: str, q_values: Any) -> tuple[dict[tuple[int, float, int, str], dict[str, Any]], list[str]]:
        """(the runs of ``task`` recorded with today's configs, one line per Q naming the runs still missing)."""
        table: dict[tuple[int, float, int, str], dict[str, Any]] = {}
        missing: list[str] = []
        for q in q_values:
            wanted = [("tuning", m, TUNE_SEED, "validation") for m in MULTIPLIERS] + \
                [("default", 1.0, s, "test") for s in SEEDS]
            found = [(name, self._lookup(task, q, m, seed, split, table)) for name, m, seed, split in wanted]
            pick = self.pick(task, q, table)
            if pick is None:
                found.append(("tuned (no pick yet)", "absent"))
            elif pick != 1.0:
                found += [("tuned", self._lookup(task, q, pick, s, "test", table)) for s in SEEDS]
            absent = [name for name, hit in found if hit != "ok"]
            stale = sum(hit == "stale" for _, hit in found)
            if absent:
                missing.append(f"{task} Q={q}: " + ", ".join(f"{n} x{absent.count(n)}" for n in dict.fromkeys(absent))
                               + (f" ({stale} recorded with another config: rerun)" if stale else ""))
        return table, missing

    def pick(self, task: str, q: int, table: Any) -> float | None:
        """The tuned multiplier at Q from the recorded tuning runs in ``table`` (None until all are there)."""
        return summarise_task(table, PRESETS[task].target, [q], SEEDS, MULTIPLIERS, TUNE_SEED)["rows"][0]["pick"]

    def _lookup(self, task: str, q: int, m: float, seed: int, split: str, table: dict) -> str:
        key = run_key(task, q, m, seed, split)
        entry = self.progress.get(key, run_fingerprint(self.config(task, q, m, seed, split)))
        if entry is not None:
            table[(q, float(m), seed, split)] = entry
            return "ok"
        return "stale" if key in self.progress.runs else "absent"

    def summaries(self, tasks: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
        """Per selected task: speedup_fit.summarise_task of what is recorded, its preset and what is missing;
        with the weak data-mode runs (``data``: N -> seed group) and the wall-clock entry (``wall``)."""
        out = {}
        for task in tasks or self.options.tasks:
            table, missing = self.table(task, self.options.q)
            preset = PRESETS[task]
            out[task] = summary = summarise_task(table, preset.target, self.options.q, SEEDS, MULTIPLIERS, TUNE_SEED)
            summary.update(missing=missing, budget=self.budget(task), about=preset.about, step_size=preset.step_size,
                           config_file=preset.config_file, step_size_key=step_size_key(self.base(task))[0])
            for row in summary["rows"]:  # B(Q) of today's preset, also where nothing is recorded yet
                row["steps"] = self.config(task, row["q"], 1.0, SEEDS[0], "test").steps
            data: dict[tuple[int, float, int, str], dict[str, Any]] = {}
            for n in (n for n in self.options.q if n > 1):
                for seed in SEEDS:
                    key = run_key(task, 1, 1.0, seed, "test", n)
                    fp = run_fingerprint(self.config(task, 1, 1.0, seed, "test", n))
                    if self.progress.get(key, fp) is not None:
                        data[(n, 1.0, seed, "test")] = self.progress.get(key, fp)
            summary["data"] = {n: group(data, n, 1.0, SEEDS, "test", preset.target)
                               for n in sorted({k[0] for k in data})}
            wall_fp = run_fingerprint(self.config(task, 1, 1.0, TUNE_SEED, "validation"))
            summary["wall"] = self.progress.get(f"{task}/wall", wall_fp)
        return out


def bench_speedup(options: SpeedupOptions, sets: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The body of the ``speedup`` JSON line: train the selected part (none with ``report_only``), then
    summarise every selected task from the progress file; ``report_only`` also writes the report.

    Raises:
        ValueError: a bad --set, an unreadable progress file, or a measured phase without a target.
    """
    if options.pilot:  # the pilot runs and summarises Q = 1 only
        options = dataclasses.replace(options, q=(1,))
    job = Speedup(options, sets, log)
    if not options.report_only:
        job.run_part()
    summaries = job.summaries()
    for line in (ln for s in summaries.values() for ln in s["missing"] if not options.pilot):
        log(f"speedup: not recorded yet: {line}")
    written = [str(p) for p in write_report(summaries, options.report, MULTIPLIERS)] if options.report_only else []
    part = {**dataclasses.asdict(options), "trained": job.trained, "reused": job.reused, "written": written}
    return {"part": part, "tasks": {task: compact_summary(s) for task, s in summaries.items()}}
