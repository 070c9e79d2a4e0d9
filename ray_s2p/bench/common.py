"""What every benchmark shares: the base config, the context, machine info, JSON lines and timing.

The benchmarks themselves are step.py, cluster.py, memory.py and driver.py; runner.py runs them.
"""

from __future__ import annotations

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
from typing import Any, Callable, TextIO

import torch

from ..config import RunConfig

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
        cases: --cases, the models of the driver benchmark (empty: smoke and llama-1b).
    """

    config: RunConfig
    user_sets: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    repeats: int = 5
    cases: tuple[str, ...] = ()  # the driver benchmark's models (empty: its default)
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
            from ..tasks import build_task
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
            "precision": t.autocast, "weights": config.precision.weights, "optimizer": o.name, "rho": o.rho,
            "directions": o.directions, "distribution": p.distribution, "mechanism": p.mechanism, "table_size": p.table_size, "seed": config.seed}


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


def paired_median_seconds(reference: Callable[[], Any], fn: Callable[[], Any], repeats: int,
                          device: torch.device | str | None = None) -> tuple[float, float]:
    """Medians of ``reference()`` and ``fn()`` timed in alternating rounds (A A B B A A B B ...).

    On a shared machine whose speed drifts by tens of percent within a minute, two
    medians taken minutes apart give a ratio that measures the drift; taken in
    alternating rounds, both see the same machine. Within a round each call is run
    once untimed and then timed, so a timed call follows a call of its own kind, as
    in a training loop (in a strict A B A B alternation on a 2-core CPU both came out
    20-30 % slower than in runs of their own kind).
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(max(1, repeats)):
        for slot, call in enumerate((reference, fn)):
            call()
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[slot].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def log(message: str) -> None:
    """Progress and driver messages go to stderr: stdout carries only the JSON lines."""
    print(message, file=sys.stderr, flush=True)
