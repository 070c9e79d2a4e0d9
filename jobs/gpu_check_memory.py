"""Check 2 of jobs/gpu_check.py: peak memory of inference, a zeroth-order step and AdamW on the Llama model."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from gpu_check_checks import (
    LlamaHolder,
    NextTokenLoss,
    SharedModelTask,
    engine_config,
    free_memory,
    oom_errors,
    parameter_bytes,
    random_tokens,
)
from gpu_check_plan import MEMORY_ADAMW_MIN, MEMORY_ZO_MAX, Plan
from ray_s2p.bench.common import log
from ray_s2p.bench.memory import _vm_hwm, current_rss, reset_peak_rss
from ray_s2p.bench.step import engine_step_fn
from ray_s2p.config import RunConfig
from ray_s2p.distributed.engine import ReplicaEngine


@contextlib.contextmanager
def peak_meter(device: torch.device, param_bytes: int) -> Iterator[dict[str, Any]]:
    """Fill a dict with the work memory of the block: ``increment_bytes`` over what was held before it.

    CUDA: max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before. CPU (smoke test only): the resettable VmHWM minus the RSS before.
    ``peak_bytes`` = the weights + the increment: what a process holding only this
    model would peak at, whatever earlier checks left allocated (e.g. noise tables).
    """
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = current_rss()
        reset_peak_rss()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize()
        top = torch.cuda.max_memory_allocated()
        out["max_memory_allocated_bytes"] = top
    else:
        top = _vm_hwm() or current_rss()
    out["before_bytes"] = before
    out["increment_bytes"] = max(0, top - before)
    out["peak_bytes"] = param_bytes + out["increment_bytes"]


def memory_llama(holder: LlamaHolder, precision: str, base: RunConfig, device: torch.device,
                 plan: Plan) -> dict[str, Any]:
    """Check 2: peak memory of inference, one zeroth-order step and AdamW steps (2 calls each)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = holder.get(dtype)
    task = NextTokenLoss()
    batch = random_tokens(plan.llama["vocab_size"], plan.llama_batch, 0x11B, device)
    weights = parameter_bytes(model)
    modes: dict[str, dict[str, Any]] = {}
    for mode in ("inference", "zeroth_order", "adamw"):
        log(f"    {mode}")
        free_memory(device)
        engine = optimizer = None
        try:
            if mode == "zeroth_order":  # built before the meter: the engine allocates no GPU memory itself
                engine = ReplicaEngine(engine_config(base, device, "hooks", "gaussian", base.perturbation.table_size),
                                       0, task=SharedModelTask(task, batch, model))
                step = engine_step_fn(engine, base.optimizer.rho)
            with peak_meter(device, weights) as meter:
                for _ in range(2):  # the second AdamW step runs with its moments already allocated
                    if mode == "inference":
                        with torch.no_grad():
                            float(task.loss(model, batch))
                    elif mode == "zeroth_order":
                        step()
                    else:
                        if optimizer is None:
                            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
                        optimizer.zero_grad(set_to_none=True)
                        with torch.enable_grad():
                            task.loss(model, batch).backward()
                        optimizer.step()
            modes[mode] = {"oom": False, **meter}
        except oom_errors() as exc:
            modes[mode] = {"oom": True, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            del engine, optimizer
            free_memory(device)
    out: dict[str, Any] = {"llama_config": dict(plan.llama), "batch_shape": list(plan.llama_batch),
                           "parameters": sum(p.numel() for p in model.parameters()), "parameter_bytes": weights,
                           "basis": "cuda_max_memory_allocated" if device.type == "cuda" else "rss_vmhwm",
                           "modes": modes, "targets": {"zeroth_order_over_inference_max": MEMORY_ZO_MAX,
                                                       "adamw_over_zeroth_order_min": MEMORY_ADAMW_MIN}}
    if not any(m["oom"] for m in modes.values()):
        zo = modes["zeroth_order"]["peak_bytes"] / modes["inference"]["peak_bytes"]
        adam = modes["adamw"]["peak_bytes"] / modes["zeroth_order"]["peak_bytes"]
        out["ratios"] = {"zeroth_order_over_inference": zo, "adamw_over_zeroth_order": adam}
        out["met"] = {"zeroth_order": zo <= MEMORY_ZO_MAX, "adamw": adam >= MEMORY_ADAMW_MIN}
    return out
