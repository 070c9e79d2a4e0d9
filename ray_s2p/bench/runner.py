"""``ray-s2p bench``: what a zeroth-order step costs, and how the trainer scales.

Each sub-benchmark prints ONE JSON line and appends it to a results file
(JSON lines, default ``bench_results.jsonl``). Every line carries ``bench``,
``time`` (UTC), ``machine`` (cpu_count, torch_threads, platform, python, torch,
ray, cuda_device), ``config`` (the config essentials) and its numbers (seconds
are wall-clock medians unless named otherwise; bytes are bytes):

- ``step`` (step.py): one in-process engine on a fixed batch; the step of
  each (mechanism, distribution) and of the naive MeZO step against the floor of
  two bare forwards, the cost split, each mechanism's extra memory.
- ``scaling`` (cluster.py): Driver runs with 1 and 2 Ray replicas; parallel
  efficiency measured, and projected to 8/64/512 replicas from the per-direction
  update cost.
- ``traffic`` (cluster.py): bytes per step per replica on the wire vs an
  fp32 gradient all-reduce (4 d bytes).
- ``memory`` (memory.py): peak memory of inference, zeroth-order training
  and AdamW fine-tuning, each in a fresh process.
- ``recovery`` (cluster.py): SIGKILL of a replica's worker mid-run; time
  until training goes on.
- ``replay`` (cluster.py): ledger replay speed vs training speed.
- ``driver`` (driver.py): the driver process's peak memory and its traffic with the
  replicas, for the smoke model and a random 1 B-parameter Llama-style model (bf16),
  each a 20-step run on 2 Ray replicas with a checkpoint every 5 (``--cases``).
- ``precision`` (precision.py): a replica's memory with bf16 weights against fp32 (what
  the model and the method add to the process), for MiniLM and the random 1 B Llama
  (``--cases minilm,llama-1b``).

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
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import RunConfig, load_config, parse_override
from .cluster import bench_recovery, bench_replay, bench_scaling, bench_traffic
from .common import BENCH_BASE, BenchContext, emit, log, machine_info
from .driver import CASES as DRIVER_CASES
from .driver import DEFAULT_CASES, bench_driver
from .memory import bench_memory
from .precision import bench_precision
from .step import bench_step

# Name -> benchmark, in the order ``ray-s2p bench`` runs them when no name is given.
BENCHES: dict[str, Callable[[BenchContext], dict[str, Any]]] = {
    "step": bench_step, "scaling": bench_scaling, "traffic": bench_traffic, "memory": bench_memory,
    "recovery": bench_recovery, "replay": bench_replay,
    "driver": lambda ctx: bench_driver(ctx, tuple(c for c in ctx.cases if c in DRIVER_CASES) or DEFAULT_CASES),
    "precision": bench_precision,
}


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
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; use {', '.join(BENCHES)}")
    body = BENCHES[name](ctx)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"bench": name, "time": stamp, "machine": machine_info(), **body}


def run_benches(names: Sequence[str], *, results: str | Path = "bench_results.jsonl", config_file: str | None = None,
                sets: Sequence[str] = (), steps: int | None = None, repeats: int = 5,
                cases: Sequence[str] = ()) -> int:
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
    ctx = BenchContext(config, user_sets, steps, repeats, tuple(cases))
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
