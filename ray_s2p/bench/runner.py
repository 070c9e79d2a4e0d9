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
- ``traffic`` (cluster.py): bytes per step per replica of probe messages (their JSON length) vs an
  fp32 gradient all-reduce (4 d bytes).
- ``hooks`` (hooks.py): one ``hooks`` probe with and without looked-up embedding rows and merged
  hook scopes, side by side with a bare forward, on a batch of real text and on the step batch.
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
- ``speedup`` (speedup.py; only when named: hours of training): steps to a target accuracy
  S(Q) against the directions per step Q per task preset, resumable from its progress file;
  its line holds, per task, S per Q (default and tuned), the fit S_inf and Q_c, E(Q) and the
  targets. Its own options (``SPEEDUP_FLAGS``) are refused for the other benchmarks.
- ``churn`` (churn.py; only when named: it starts a Ray cluster of its own): steps per minute of
  a replica range whose nodes are removed and added at seeded moments, against the same steps
  without churn.

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
from typing import Any, Callable, Mapping, Sequence

from ..config import RunConfig, load_config
from ..config_parse import parse_override
from ..errors import RayS2PError
from .churn import bench_churn
from .cluster import bench_recovery, bench_replay, bench_scaling, bench_traffic
from .common import BENCH_BASE, BenchContext, emit, log, machine_info
from .driver import CASES as DRIVER_CASES
from .driver import DEFAULT_CASES, bench_driver
from .hooks import bench_hooks
from .memory import bench_memory
from .precision import bench_precision
from .speedup import MEASURED, NAMED_PHASES, PHASES, PRESETS, SpeedupOptions, bench_speedup
from .step import bench_step

# Name -> benchmark, in the order ``ray-s2p bench`` runs them when no name is given.
BENCHES: dict[str, Callable[[BenchContext], dict[str, Any]]] = {
    "step": bench_step, "hooks": bench_hooks, "scaling": bench_scaling, "traffic": bench_traffic,
    "memory": bench_memory,
    "recovery": bench_recovery, "replay": bench_replay,
    "driver": lambda ctx: bench_driver(ctx, tuple(c for c in ctx.cases if c in DRIVER_CASES) or DEFAULT_CASES),
    "precision": bench_precision,
}
# Run only when named: a speedup measurement trains for hours, a plain `ray-s2p bench` must not start it.
BY_NAME_ONLY = ("speedup", "churn")  # churn starts a Ray cluster of its own and trains for minutes
# The speedup benchmark's options (SpeedupOptions field -> CLI flag).
SPEEDUP_FLAGS = {"tasks": "--tasks", "q": "--q", "phase": "--phase", "progress": "--progress", "output": "--output",
                 "report": "--report", "resume": "--resume", "report_only": "--report-only", "pilot": "--pilot",
                 "budget": "--budget", "keep_runs": "--keep-runs"}


def _items(value: str | Sequence[Any]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]


def speedup_options(names: Sequence[str], raw: Mapping[str, Any]) -> SpeedupOptions | None:
    """The speedup benchmark's options from the CLI's values (None or False: not given).

    Args:
        names: the benchmarks named on the command line.
        raw: ``SPEEDUP_FLAGS`` field -> value (``tasks`` and ``q`` as "a,b" strings or sequences).

    Returns:
        The options, or None when ``speedup`` is not among ``names``.

    Raises:
        ValueError: an option given without ``speedup``, an unknown task, a Q that is not a positive
            integer, an unknown phase, a budget below 1, or options that exclude each other.
    """
    given = {k: v for k, v in raw.items() if v is not None and v is not False}
    flags = [SPEEDUP_FLAGS[k] for k in given]
    if "speedup" not in names:
        if flags:
            raise RayS2PError(f"{flags[0]} applies only to the speedup benchmark. Fix: name it "
                             f"(`ray-s2p bench speedup {flags[0]} ...`) or leave {flags[0]} out")
        return None
    if "tasks" in given:
        tasks = _items(given["tasks"])
        bad = [t for t in tasks if t not in PRESETS] or ([] if tasks else ["(none)"])
        if bad:
            raise RayS2PError(f"--tasks: unknown task {bad[0]!r}. Fix: choose from {', '.join(PRESETS)}")
        given["tasks"] = tuple(dict.fromkeys(tasks))
    if "q" in given:
        qs = _items(given["q"])
        bad = [q for q in qs if not (q.isdigit() and int(q) >= 1)] or ([] if qs else ["(none)"])
        if bad:
            raise RayS2PError(f"--q: {bad[0]!r} is not a positive integer. Fix: give directions per step, "
                             f"e.g. --q 1,2,4")
        given["q"] = tuple(sorted({int(q) for q in qs}))
    if given.get("phase", "all") not in ("all", *PHASES, *NAMED_PHASES):
        raise RayS2PError(f"--phase {given['phase']!r}: use {', '.join(PHASES + NAMED_PHASES)} or all")
    if given.get("budget", 1) < 1:
        raise RayS2PError(f"--budget {given['budget']}: forward passes per run. Fix: use 1 or more")
    if given.get("pilot") and ({"q", "phase", "report_only"} & set(given)):
        raise RayS2PError("--pilot runs Q = 1 only (m = 1, seed 0, validation). Fix: leave out --q, --phase "
                         "and --report-only")
    return SpeedupOptions(**given)


def bench_config(config_file: str | None, sets: Sequence[str]) -> tuple[RunConfig, dict[str, Any]]:
    """The base config and the parsed --set overrides.

    Without ``config_file`` the base is the default config with ``BENCH_BASE``; a
    config file is taken as it is (it is the user's choice of model and batch).
    """
    # Without a file: the dataclass defaults (not the default job) plus the benchmark's own settings.
    config = load_config(config_file) if config_file is not None else RunConfig().replace(BENCH_BASE)
    user_sets = dict(parse_override(s) for s in sets)
    return (config.replace(user_sets) if user_sets else config), user_sets


def run_one(name: str, ctx: BenchContext, speedup: SpeedupOptions | None = None) -> dict[str, Any]:
    """Run one sub-benchmark and return its record (without printing it); ``speedup``: that benchmark's options."""
    table = {**BENCHES, "speedup": lambda c: bench_speedup(speedup or SpeedupOptions(), c.user_sets, log),
             "churn": bench_churn}
    if name not in table:
        raise RayS2PError(f"unknown benchmark {name!r}; use {', '.join(table)}")
    body = table[name](ctx)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"bench": name, "time": stamp, "machine": machine_info(), **body}


def run_benches(names: Sequence[str], *, results: str | Path = "bench_results.jsonl", config_file: str | None = None,
                sets: Sequence[str] = (), steps: int | None = None, repeats: int = 5,
                cases: Sequence[str] = (), speedup: Mapping[str, Any] | SpeedupOptions | None = None) -> int:
    """Run the named sub-benchmarks (all but ``BY_NAME_ONLY`` when empty) in order; one JSON line each.

    A failing benchmark is reported on stderr and the others still run. ``speedup``: that benchmark's
    options (``SpeedupOptions``, or the CLI's values as ``speedup_options`` takes them).

    Returns:
        0 when every benchmark produced its line, 1 otherwise.

    Raises:
        ValueError: an unknown name, non-positive --steps / --repeats, a speedup option without
            ``speedup`` or a bad one, or --config with ``speedup`` (its presets name their configs).
    """
    chosen = list(names) or list(BENCHES)
    unknown = [n for n in chosen if n not in BENCHES and n not in BY_NAME_ONLY]
    if unknown:
        raise RayS2PError(f"unknown benchmark {unknown[0]!r}. Fix: choose from {', '.join([*BENCHES, *BY_NAME_ONLY])}")
    options = speedup if isinstance(speedup, SpeedupOptions) else speedup_options(chosen, speedup or {})
    if "speedup" in chosen and config_file is not None:
        raise RayS2PError(f"--config: the speedup benchmark's presets ({', '.join(MEASURED)}, tiny) name their own "
                         f"config files. Fix: leave --config out (--set still applies to every preset)")
    if steps is not None and steps < 2:
        raise RayS2PError(f"--steps {steps}: the step time is a difference between steps. Fix: use --steps 2 or more")
    if repeats < 1:
        raise RayS2PError(f"--repeats {repeats}: use 1 or more")
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
                emit(run_one(name, ctx, options), results, stream=out)
            except Exception as exc:  # one broken benchmark must not hide the others' numbers
                failed.append(name)
                log(f"ray-s2p bench {name}: error: {type(exc).__name__}: {exc}")
    return 1 if failed else 0
