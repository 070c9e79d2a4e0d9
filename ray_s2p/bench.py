"""``ray-s2p bench``: what a zeroth-order step costs, and how the trainer scales.

Each sub-benchmark prints ONE JSON line and appends it to a results file
(JSON lines, default ``bench_results.jsonl``). Every line carries ``bench``,
``time`` (UTC), ``machine`` (cpu_count, torch_threads, platform, python, torch,
ray, cuda_device), ``config`` (the config essentials) and its numbers (seconds
are wall-clock medians unless named otherwise; bytes are bytes):

- ``step`` (bench_step.py): one in-process engine on a fixed batch; the step of
  each (mechanism, distribution) and of the naive MeZO step against the floor of
  two bare forwards, the cost split, each mechanism's extra memory.
- ``scaling`` (bench_cluster.py): Driver runs with 1 and 2 Ray replicas; parallel
  efficiency measured, and projected to 8/64/512 replicas from the per-direction
  update cost.
- ``traffic`` (bench_cluster.py): bytes per step per replica on the wire vs an
  fp32 gradient all-reduce (4 d bytes).
- ``memory`` (bench_memory.py): peak memory of inference, zeroth-order training
  and AdamW fine-tuning, each in a fresh process.
- ``recovery`` (bench_cluster.py): SIGKILL of a replica's worker mid-run; time
  until training goes on.
- ``replay`` (bench_cluster.py): ledger replay speed vs training speed.

The base config (when no ``--config`` is given) is the default MiniLM
text_classification job with every parameter trainable, no feature reuse, batch
16 x 64 tokens (``BENCH_BASE``); ``--set`` overrides win over everything the
benchmarks set themselves (e.g. ``--set cluster.threads_per_replica=2``), except
the keys that define a benchmark (replica counts, Ray or not, the step variants).
Numbers depend on the machine's load: compare lines taken on a quiet machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch

from .config import RunConfig, load_config, parse_override

BENCHES = ("step", "scaling", "traffic", "memory", "recovery", "replay")

# The benchmarks' common model and batch: MiniLM with every parameter moving, the whole
# network run per probe (feature reuse would skip nothing with trainable=all anyway, but
# turning it off keeps the forward the same for every trainable choice given by --set).
BENCH_BASE: dict[str, Any] = {
    "task.name": "text_classification",
    "task.model": "minilm",
    "task.trainable": "all",
    "task.feature_reuse": False,
    "task.batch_size": 16,
    "task.max_length": 64,
}
# Per-benchmark default step counts when --steps is not given.
DEFAULT_STEPS = {"scaling": 6, "traffic": 6, "recovery": 12, "replay": 10}
BENCH_SEED = 0xBE7C  # seeds of the benchmark's own directions and batches (never the global RNG)


@dataclass
class BenchContext:
    """What the sub-benchmarks share in one ``ray-s2p bench`` call.

    Args:
        config: the base config (BENCH_BASE or --config, then --set).
        user_sets: the --set overrides, re-applied over every benchmark's own settings.
        steps: --steps (None: each benchmark's default).
        repeats: timed repetitions per measurement (after one warm-up).
    """

    config: RunConfig
    user_sets: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    repeats: int = 5
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. the scaling runs, reused by traffic

    def derive(self, overrides: dict[str, Any], fixed: dict[str, Any] | None = None) -> RunConfig:
        """The base config with a benchmark's settings, the user's --set again, then what defines the benchmark.

        The user's --set wins over ``overrides`` (e.g. threads per replica), but not over
        ``fixed``: the keys that make the benchmark what it is (1 vs 2 replicas, Ray or not).
        """
        return self.config.replace({**overrides, **self.user_sets, **(fixed or {})})

    def steps_for(self, bench: str) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS.get(bench, 6)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def local_config(self) -> RunConfig:
        """The config for in-process engines: on a GPU machine the engine reserves (and so uses) the GPU."""
        if self.device.type == "cuda" and self.config.cluster.gpus_per_replica == 0:
            return self.derive({"cluster.gpus_per_replica": 1}, {"cluster.use_ray": False})
        return self.derive({}, {"cluster.use_ray": False})

    def task(self) -> Any:
        """The task of the base config, built once (MiniLM's data takes seconds to tokenize)."""
        if "task" not in self.cache:
            from .tasks import build_task
            self.cache["task"] = build_task(self.config.task, self.config.seed)
        return self.cache["task"]


# ----------------------------------------------------------------- records
def machine_info() -> dict[str, Any]:
    """Where the numbers were taken: the first thing to compare between two result lines."""
    try:
        ray_version = metadata.version("ray")  # no `import ray`: it is slow and not needed here
    except metadata.PackageNotFoundError:
        ray_version = None
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version, "cuda_device": cuda}


def config_essentials(config: RunConfig) -> dict[str, Any]:
    """The config fields a benchmark number depends on."""
    t, o, p = config.task, config.optimizer, config.perturbation
    return {"task": t.name, "model": t.model, "dataset": t.dataset, "trainable": t.trainable,
            "feature_reuse": t.feature_reuse, "batch_size": t.batch_size, "max_length": t.max_length,
            "precision": t.precision, "optimizer": o.name, "rho": o.rho, "directions": o.directions,
            "distribution": p.distribution, "mechanism": p.mechanism, "table_size": p.table_size, "seed": config.seed}


def _clean(value: Any) -> Any:
    """JSON-safe numbers: non-finite floats become null (strict JSON has no NaN), 6 significant digits."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def emit(record: dict[str, Any], results: str | Path, stream: TextIO | None = None) -> str:
    """Print the record as one JSON line (to ``stream``, default stdout) and append it to ``results``.

    The file is flushed and fsynced after each line.

    Returns:
        The JSON line (without the newline).
    """
    line = json.dumps(_clean(record), separators=(", ", ": "))
    print(line, file=stream or sys.stdout, flush=True)
    path = Path(results)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())  # a long benchmark run killed later keeps every line already written
    return line


# ----------------------------------------------------------------- timing
def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the work and not just its launch."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device | str | None = None,
                   warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    The median rather than the mean: a busy machine adds one-sided outliers.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def log(message: str) -> None:
    """Progress and driver messages go to stderr: stdout carries only the JSON lines."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- driver
def bench_config(config_file: str | None, sets: Sequence[str]) -> tuple[RunConfig, dict[str, Any]]:
    """The base config and the parsed --set overrides.

    Without ``config_file`` the base is the default config with ``BENCH_BASE``; a
    config file is taken as it is (it is the user's choice of model and batch).
    """
    # Without a file: the dataclass defaults (not the default job) plus the benchmark's own settings.
    config = load_config(config_file) if config_file is not None else RunConfig().replace(BENCH_BASE)
    user_sets = dict(parse_override(s) for s in sets)
    return (config.replace(user_sets) if user_sets else config), user_sets


def run_one(name: str, ctx: BenchContext) -> dict[str, Any]:
    """Run one sub-benchmark and return its record (without printing it)."""
    if name == "step":
        from .bench_step import bench_step
        body = bench_step(ctx)
    elif name == "memory":
        from .bench_memory import bench_memory
        body = bench_memory(ctx)
    elif name in ("scaling", "traffic", "recovery", "replay"):
        from . import bench_cluster
        body = getattr(bench_cluster, f"bench_{name}")(ctx)
    else:
        raise ValueError(f"unknown benchmark {name!r}; use {', '.join(BENCHES)}")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"bench": name, "time": stamp, "machine": machine_info(), **body}


def run_benches(names: Sequence[str], *, results: str | Path = "bench_results.jsonl", config_file: str | None = None,
                sets: Sequence[str] = (), steps: int | None = None, repeats: int = 5) -> int:
    """Run the named sub-benchmarks (all when empty) in order; one JSON line each.

    A failing benchmark is reported on stderr and the others still run.

    Returns:
        0 when every benchmark produced its line, 1 otherwise.

    Raises:
        ValueError: an unknown name, or non-positive --steps / --repeats.
    """
    chosen = list(names) or list(BENCHES)
    unknown = [n for n in chosen if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}. Fix: choose from {', '.join(BENCHES)}")
    if steps is not None and steps < 2:
        raise ValueError(f"--steps {steps}: the step time is a difference between steps. Fix: use --steps 2 or more")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: use 1 or more")
    config, user_sets = bench_config(config_file, sets)
    ctx = BenchContext(config, user_sets, steps, repeats)
    failed = []
    out = sys.stdout
    # stdout carries only the result lines: what else prints there while a benchmark runs (Ray
    # prints raylet errors such as a killed worker to stdout, libraries print progress) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        for name in chosen:
            log(f"ray-s2p bench: {name} ...")
            try:
                emit(run_one(name, ctx), results, stream=out)
            except Exception as exc:  # one broken benchmark must not hide the others' numbers
                failed.append(name)
                log(f"ray-s2p bench {name}: error: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


__all__ = ["BENCHES", "BENCH_BASE", "BenchContext", "bench_config", "config_essentials", "emit", "machine_info",
           "median_seconds", "run_benches", "run_one"]
