"""``ray-s2p bench precision``: a replica's memory with bf16 weights against fp32, model by model.

For each case and each ``precision.weights`` (fp32, then bf16) one fresh process
(memory.py's ``zeroth_order`` child: a ReplicaEngine, hooks mechanism, the config's
direction distribution) builds the task, records the resident set before the model
exists (``pre_model_rss``), builds the model, and runs the steps. The number compared
is what the model and the method add to the process while it trains:

    replica_bytes = work_peak_rss - pre_model_rss

(the peak of the steps, VmHWM reset after the build, minus the libraries, tokenizer
and data). A whole-process peak cannot show a 2x saving on a small model: on a CPU
the ~0.6 GB of Python, torch and transformers weighs more than MiniLM itself. The
transient of building the model is left out (a 1 B model built in fp32 and cast would
count twice); the fp32 and bf16 runs of the llama case build their model in the
target dtype directly.

Cases (``--cases``; names of the driver benchmark are ignored here):

- ``minilm``: the benchmark base config (MiniLM, all 22.7 M parameters, batch 16 x 64
  tokens), with the user's --set;
- ``llama-1b``: the random 0.95 B Llama-style model of random_llama.py, every
  parameter trainable, batch 1 x 16 random tokens, Gaussian directions (the run's
  own ``--set`` still wins);
- ``llama-tiny``: the same at the tiny spec (quick checks).

Target (issue: half-precision weights): bf16 replica bytes <= 0.55x fp32 for every case.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..errors import RayS2PError
from .common import BenchContext, config_essentials, log
from .memory import run_child
from .random_llama import LLAMA_1B, LLAMA_TINY

CASES = ("minilm", "llama-tiny", "llama-1b")
DEFAULT_CASES = ("minilm", "llama-1b")
PRECISIONS = ("fp32", "bf16")
RATIO_MAX = 0.55
LLAMA_MEMORY: dict[str, Any] = {
    "task.name": "ray_s2p.bench.random_llama:build", "task.batch_size": 1, "task.max_length": 16,
    "task.eval_size": 2, "task.trainable": "all", "optimizer.name": "vs2p", "optimizer.rho": 0.01,
    "perturbation.distribution": "gaussian",
}


def case_config(case: str, weights: str, ctx: BenchContext) -> RunConfig:
    """The config of one (case, weights) run: the case's model, the weights' dtype, then the user's --set.

    Raises:
        ValueError: an unknown case.
    """
    if case == "minilm":
        return ctx.local_config().replace({"precision.weights": weights})
    if case in ("llama-1b", "llama-tiny"):
        spec = LLAMA_1B if case == "llama-1b" else LLAMA_TINY
        # The model is built in the dtype it is trained in: no fp32 build transient in the bf16 run.
        return ctx.derive({**LLAMA_MEMORY, "task.options": {**spec, "dtype": weights}},
                          {"cluster.use_ray": False, "precision.weights": weights})
    raise RayS2PError(f"bench precision: unknown case {case!r}. Fix: choose from {', '.join(CASES)}")


def replica_bytes(child: dict[str, Any]) -> int:
    """What the model and the method add while training: the steps' peak minus the pre-model resident set."""
    if child.get("cuda_peak") is not None:
        return int(child["cuda_peak"])  # on a GPU the device memory is the model's and the method's alone
    return int((child["work_peak_rss"] or child["peak_rss"]) - child["pre_model_rss"])


def bench_precision(ctx: BenchContext) -> dict[str, Any]:
    """The ``precision`` benchmark: each (case, weights) in a fresh process, then bf16 / fp32 per case."""
    cases = tuple(c for c in ctx.cases if c in CASES) or DEFAULT_CASES
    results: dict[str, Any] = {}
    words = []
    for case in cases:
        runs = {}
        for weights in PRECISIONS:
            config = case_config(case, weights, ctx)
            log(f"  {case}, {weights} weights, in a fresh process")
            child = run_child("zeroth_order", config, timeout=3600.0)
            runs[weights] = {**child, "replica_bytes": replica_bytes(child)}
        ratio = runs["bf16"]["replica_bytes"] / runs["fp32"]["replica_bytes"]
        results[case] = {"runs": runs, "bf16_over_fp32": ratio, "met": ratio <= RATIO_MAX,
                         "config": config_essentials(case_config(case, "bf16", ctx))}
        words.append(f"{case}: {runs['fp32']['replica_bytes'] / 2**20:.0f} MiB fp32, "
                     f"{runs['bf16']['replica_bytes'] / 2**20:.0f} MiB bf16 = {ratio:.3f}x "
                     f"(target <= {RATIO_MAX} {'met' if ratio <= RATIO_MAX else 'NOT met'}; parameters "
                     f"{runs['fp32']['parameter_bytes'] / 2**20:.0f} / {runs['bf16']['parameter_bytes'] / 2**20:.0f} MiB)")
    return {"config": {"cases": list(cases), "precisions": list(PRECISIONS), "llama": LLAMA_MEMORY},
            "unit": "bytes", "cases": results,
            "targets": {"bf16_over_fp32_max": RATIO_MAX, "met": all(r["met"] for r in results.values())},
            "verdict": "replica bytes (steps' peak RSS minus the pre-model RSS): " + "; ".join(words)}
