"""``ray-s2p bench driver``: the driver's peak memory and its traffic do not depend on the model.

Each case is a real ``Driver`` run on 2 Ray replicas, 20 steps, a checkpoint every 5
(``DRIVER_RUN``), in a fresh Python process (``python -m ray_s2p.bench.driver``, the
config as JSON on stdin) that starts its own local Ray: a process's peak resident set
only grows, so cases measured in one process would share their peaks. Cases:

- ``smoke``: jobs/configs/smoke.yaml (the 2-layer MLP of the synthetic task);
- ``llama-1b``: a randomly initialised Llama-style model (random_llama.py, the spec of
  jobs/gpu_check_plan.py, 0.95 B parameters) with bf16 weights (``precision.weights: bf16``),
  every parameter trainable, low-rank directions; batch 1 x 16 random tokens, so that a
  forward of 1 B parameters stays within seconds on a CPU core;
- ``llama-tiny``: the same task at the tiny spec (for quick checks of the Llama path).

Numbers per case (bytes): the driver process's ``peak_rss`` (ru_maxrss, the whole process),
``vm_hwm`` (/proc VmHWM, the same peak from Linux), ``rss_ray_up`` (resident set once
Ray is up, before the Driver), the checkpoint's tensor-file size, and the traffic
between the driver and the replicas counted by the pools (distributed/messages.py ``Traffic``: every
call, probes, digests, evaluation, checkpoints, restores and the final export, by payload
size) with the largest single message. Targets: the largest case's driver peak RSS
within 10 % of the smoke case's, and no message of 1 MB or more.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..errors import RayS2PError
from .common import BenchContext, config_essentials, log
from .memory import _vm_hwm, current_rss, peak_rss
from .random_llama import LLAMA_1B, LLAMA_TINY

SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "smoke.yaml"
# What every case shares: the run the issue names (2 replicas, 20 steps, a checkpoint every 5).
DRIVER_RUN: dict[str, Any] = {
    "steps": 20, "checkpoint_every": 5, "eval_every": 10, "log_every": 5, "progress": False,
    "cluster.use_ray": True, "cluster.replicas": 2, "cluster.mode": "direction", "cluster.cpus_per_replica": 1,
    "cluster.threads_per_replica": 1, "cluster.digest_every": 5,
}
LLAMA_RUN: dict[str, Any] = {
    "task.name": "ray_s2p.bench.random_llama:build", "task.batch_size": 1, "task.max_length": 16,
    "task.eval_size": 2, "task.trainable": "all", "precision.weights": "bf16",
    "optimizer.name": "vs2p", "optimizer.eta": 2.0, "optimizer.rho": 0.01,
    "perturbation.distribution": "lowrank", "perturbation.rank": 2,
    "cluster.step_timeout_s": 900, "cluster.startup_timeout_s": 900,
}
CASES = ("smoke", "llama-tiny", "llama-1b")
DEFAULT_CASES = ("smoke", "llama-1b")
PEAK_RSS_RATIO_MAX = 1.10
LARGEST_MESSAGE_MAX = 1_000_000


def case_config(case: str, ctx: BenchContext) -> RunConfig:
    """The config of one case: its model, ``DRIVER_RUN``, then the user's --set.

    Raises:
        ValueError: an unknown case, or the smoke config file is missing.
    """
    if case == "smoke":
        if not SMOKE_CONFIG.is_file():
            raise RayS2PError(f"bench driver: {SMOKE_CONFIG} is missing. Fix: run from a source checkout")
        base = load_config(SMOKE_CONFIG)
        overrides: dict[str, Any] = {}
    elif case in ("llama-1b", "llama-tiny"):
        base = RunConfig()
        spec = LLAMA_1B if case == "llama-1b" else LLAMA_TINY
        overrides = {**LLAMA_RUN, "task.options": {**spec, "dtype": "bf16"}}
    else:
        raise RayS2PError(f"bench driver: unknown case {case!r}. Fix: choose from {', '.join(CASES)}")
    return base.replace({**overrides, **DRIVER_RUN, **ctx.user_sets})


def _safetensors_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its JSON header (shapes only; no tensor is read)."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += count
    return total


def measure(config: RunConfig, workdir: Path) -> dict[str, Any]:
    """Run the Driver in this process on a fresh local Ray and return its peak memory and traffic."""
    import ray

    from ..distributed.checkpoint import list_checkpoints
    from ..distributed.driver import Driver

    ray.init(num_cpus=config.cluster.replicas * config.cluster.cpus_per_replica, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    try:
        rss_ray_up = current_rss()
        started = time.perf_counter()
        result = Driver(config, workdir / "run", log=log).run()
        seconds = time.perf_counter() - started
        out: dict[str, Any] = {"peak_rss": peak_rss(), "vm_hwm": _vm_hwm(), "rss_ray_up": rss_ray_up,
                               "wall_seconds": seconds}
    finally:
        ray.shutdown()
    newest = list_checkpoints(workdir / "run" / "checkpoints")[-1] / "params.safetensors"
    final = workdir / "run" / "final"
    out.update({"parameters": _safetensors_parameters(newest), "checkpoint_bytes": newest.stat().st_size,
                "final_bytes": sum(p.stat().st_size for p in final.rglob("*") if p.is_file()),
                "steps": result.steps_completed, "final_digest": result.final_digest,
                "traffic": result.summary["traffic"]})
    return out


def run_child(config: RunConfig, timeout: float = 3600.0) -> dict[str, Any]:
    """``measure`` in a fresh interpreter; its last stdout line is the JSON result.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    root = str(Path(__file__).resolve().parent.parent.parent)  # importable even when not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-m", "ray_s2p.bench.driver"], input=json.dumps(config.to_dict()),
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"driver bench child exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def bench_driver(ctx: BenchContext, cases: tuple[str, ...] = DEFAULT_CASES) -> dict[str, Any]:
    """The ``driver`` benchmark: each case in a fresh process, then the RSS ratio and the largest message."""
    if "smoke" not in cases:
        raise RayS2PError("bench driver: the cases must include smoke (the reference of the RSS ratio)")
    results = {}
    essentials = config_essentials(case_config("smoke", ctx))
    for case in cases:
        config = case_config(case, ctx)
        log(f"  {case}: {config.task.name}, {config.steps} steps, checkpoint every {config.checkpoint_every}")
        results[case] = {"task": config.task.name, "options": dict(config.task.options),
                         "batch_size": config.task.batch_size, "max_length": config.task.max_length,
                         "weights": config.precision.weights, **run_child(config)}
    largest_case = max(cases, key=lambda c: results[c]["parameters"])
    ratio = results[largest_case]["peak_rss"] / results["smoke"]["peak_rss"]
    largest = max((results[c]["traffic"]["largest_message"] | {"case": c} for c in cases), key=lambda m: m["bytes"])
    rss_met, message_met = ratio <= PEAK_RSS_RATIO_MAX, largest["bytes"] < LARGEST_MESSAGE_MAX
    mib = ", ".join(f"{c} {results[c]['peak_rss'] / 2**20:.0f} MiB ({results[c]['parameters']:,} parameters)"
                    for c in cases)
    verdict = (f"driver peak RSS {mib}: {largest_case} / smoke = {ratio:.3f} (target <= {PEAK_RSS_RATIO_MAX} "
               f"{'met' if rss_met else 'NOT met'}); largest message {largest['bytes']} bytes ({largest['method']}, "
               f"{largest['direction']}, {largest['case']}; target < {LARGEST_MESSAGE_MAX} "
               f"{'met' if message_met else 'NOT met'})")
    return {"config": {**essentials, "run": DRIVER_RUN, "llama": LLAMA_RUN, "cases": list(cases)}, "unit": "bytes",
            "cases": results, "largest_case": largest_case, "peak_rss_ratio": ratio, "largest_message": largest,
            "targets": {"peak_rss_ratio_max": PEAK_RSS_RATIO_MAX, "largest_message_max": LARGEST_MESSAGE_MAX,
                        "peak_rss_met": rss_met, "largest_message_met": message_met},
            "verdict": verdict}


def main() -> int:
    """Child entry point: ``python -m ray_s2p.bench.driver`` with the config JSON on stdin."""
    config = RunConfig.from_dict(json.loads(sys.stdin.read()))
    workdir = Path(tempfile.mkdtemp(prefix="ray_s2p_bench_driver_"))
    try:
        out = measure(config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a 1 B run leaves gigabytes of checkpoints
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
