"""``ray-s2p bench memory``: peak memory of inference, zeroth-order training and AdamW fine-tuning.

Each mode runs in a fresh Python process (``python -m ray_s2p.bench.memory MODE``,
the config as JSON on stdin), because a process's peak resident set only grows:
measured in one process, the second mode would inherit the first one's peak.
Each child builds the task and the model, makes the benchmark batch, records the
baseline, does 5 steps, and prints one JSON line:

- ``inference``: 5 forwards under no_grad.
- ``zeroth_order``: 5 ReplicaEngine steps (hooks, the config's distribution, Gaussian by default;
  two probes + update).
- ``adamw``: 5 steps of backward + AdamW over the trainable parameters.

Numbers (bytes): ``pre_model_rss`` (resident set after imports + task build, before the
model exists), ``baseline_rss`` (resident set after imports + task + model
build), ``baseline_peak_rss`` (ru_maxrss then), ``peak_rss`` (ru_maxrss at the
end: the whole process's peak, as asked), ``work_peak_rss`` (the peak of the 5
steps alone: Linux's VmHWM, reset at the baseline through /proc/self/clear_refs;
null where that is not possible), ``increment_rss`` (work peak - baseline), and on
CUDA ``cuda_baseline`` / ``cuda_peak`` (torch.cuda.max_memory_allocated).

Why two bases: building the model and tokenizing the data leave a transient
peak that ru_maxrss keeps for ever, and on CPU the RSS includes Python, torch,
transformers and the data (the same in every mode). Whole-process peaks answer
"how big a machine", increments "what the training method costs". The targets
(ZO <= 1.2x inference, AdamW >= 3x ZO) are judged on both (``peak``: cuda_peak on
a GPU, else peak_rss; ``increment``: cuda_peak - cuda_baseline, else
increment_rss) and spelled out in ``verdict``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import RayS2PError
from .common import BenchContext, config_essentials, log

MODES = ("inference", "zeroth_order", "adamw")
MEMORY_STEPS = 5


def peak_rss() -> int:
    """The process's peak resident set in bytes (ru_maxrss is KB on Linux, bytes on macOS)."""
    import resource
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def current_rss() -> int:
    """The resident set now, in bytes (/proc on Linux; elsewhere the peak is the best available)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def _vm_hwm() -> int | None:
    """VmHWM (peak resident set, resettable) from /proc/self/status, in bytes; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


def measure(mode: str, config: RunConfig, steps: int = MEMORY_STEPS) -> dict[str, Any]:
    """Build, record the baseline, run ``steps`` steps of ``mode``, record the peaks (in this process).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise RayS2PError(f"unknown memory mode {mode!r}; use {', '.join(MODES)}")
    from ..distributed.engine import WEIGHT_DTYPES, ReplicaEngine, to_device
    from ..tasks import build_task
    from .step import FixedBatchTask, engine_step_fn, fixed_batch

    task = build_task(config.task, config.seed)
    gc.collect()
    pre_model_rss = current_rss()  # libraries, tokenizer and data: everything but the model
    engine = None
    if mode == "zeroth_order":
        engine = ReplicaEngine(config.replace({"perturbation.mechanism": "hooks"}), 0, task=task)
        model, names, device = engine.model, engine.trainable, engine.device
        batch = fixed_batch(task, model, config)
        engine.task = FixedBatchTask(task, batch)
    else:
        model = task.build_model()
        weights = WEIGHT_DTYPES[config.precision.weights]
        if weights != torch.float32:
            model.to(weights)  # as ReplicaEngine does, so that every mode holds the same weights
        names = task.trainable_names(model)
        use_gpu = config.cluster.gpus_per_replica > 0 and torch.cuda.is_available()
        device = torch.device("cuda" if use_gpu else "cpu")
        model.to(device)
        batch = fixed_batch(task, model, config)
    on_device = to_device(batch, device)
    cuda = device.type == "cuda"
    gc.collect()  # the build's garbage must not count as the baseline
    out: dict[str, Any] = {"mode": mode, "steps": steps, "device": str(device),
                           "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                           "weights": config.precision.weights, "pre_model_rss": pre_model_rss,
                           "baseline_rss": current_rss(), "baseline_peak_rss": peak_rss()}
    hwm_reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        out["cuda_baseline"] = torch.cuda.memory_allocated()

    if mode == "inference":
        with torch.no_grad():
            prepared = task.prepare(model, on_device, names)
            for _ in range(steps):
                float(task.loss(model, prepared))
    elif mode == "zeroth_order":
        assert engine is not None
        step = engine_step_fn(engine, config.optimizer.rho)
        for _ in range(steps):
            step()
    else:
        wanted = set(names)
        params = [p for n, p in model.named_parameters() if n in wanted]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = task.loss(model, on_device)
                loss.backward()
            optimizer.step()

    if cuda:
        torch.cuda.synchronize()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    out["peak_rss"] = peak_rss()
    out["work_peak_rss"] = _vm_hwm() if hwm_reset else None
    out["increment_rss"] = (out["work_peak_rss"] or out["peak_rss"]) - out["baseline_rss"]
    return out


def run_child(mode: str, config: RunConfig, timeout: float = 1800.0) -> dict[str, Any]:
    """``measure(mode)`` in a fresh interpreter; its last stdout line is the JSON result.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    root = str(Path(__file__).resolve().parent.parent)  # importable even when not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-m", "ray_s2p.bench.memory", mode], input=json.dumps(config.to_dict()),
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child {mode!r} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _judge(values: dict[str, float]) -> dict[str, Any]:
    """The two ratios and whether each target holds, for one basis (per-mode bytes)."""
    zo = values["zeroth_order"] / values["inference"] if values["inference"] > 0 else float("inf")
    adam = values["adamw"] / values["zeroth_order"] if values["zeroth_order"] > 0 else float("inf")
    return {"zeroth_order_over_inference": zo, "adamw_over_zeroth_order": adam,
            "zeroth_order_met": zo <= 1.2, "adamw_met": adam >= 3.0}


def bench_memory(ctx: BenchContext) -> dict[str, Any]:
    """The ``memory`` benchmark: three children, then ratios on both bases and a plain-words verdict."""
    config = ctx.local_config()
    modes = {}
    for mode in MODES:
        log(f"  {mode} in a fresh process")
        modes[mode] = run_child(mode, config)
    cuda = all("cuda_peak" in m for m in modes.values())
    peak = {m: modes[m]["cuda_peak" if cuda else "peak_rss"] for m in MODES}
    inc = {m: (modes[m]["cuda_peak"] - modes[m]["cuda_baseline"]) if cuda else modes[m]["increment_rss"]
           for m in MODES}
    judged = {"peak": _judge(peak), "increment": _judge(inc)}
    words = []
    for basis, j in judged.items():
        words.append(f"{basis} ({'cuda' if cuda else 'rss'}): ZO {j['zeroth_order_over_inference']:.2f}x inference "
                     f"(target <= 1.2x {_met(j['zeroth_order_met'])}), AdamW {j['adamw_over_zeroth_order']:.2f}x ZO "
                     f"(target >= 3x {_met(j['adamw_met'])})")
    mib = ", ".join(f"{m} {inc[m] / 2**20:.0f} MiB" for m in MODES)
    return {"config": {**config_essentials(config), "device": modes["inference"]["device"]},
            "steps": MEMORY_STEPS, "unit": "bytes", "basis": "cuda" if cuda else "rss", "modes": modes,
            "peak_bytes": peak, "increment_bytes": inc, "ratios": judged,
            "targets": {"zeroth_order_over_inference_max": 1.2, "adamw_over_zeroth_order_min": 3.0,
                        "peak_met": judged["peak"]["zeroth_order_met"] and judged["peak"]["adamw_met"],
                        "increment_met": judged["increment"]["zeroth_order_met"] and judged["increment"]["adamw_met"]},
            "verdict": "; ".join(words) + f". Increments over the baseline: {mib}."}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m ray_s2p.bench.memory MODE`` with the config JSON on stdin."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m ray_s2p.bench.memory {{{','.join(MODES)}}} < config.json", file=sys.stderr)
        return 2
    config = RunConfig.from_dict(json.loads(sys.stdin.read()))
    print(json.dumps(measure(args[0], config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
