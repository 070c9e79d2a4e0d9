"""The Markdown summary of jobs/gpu_check.py (three tables: step, memory, comparison)."""

from __future__ import annotations

from typing import Any

import torch

from gpu_check_plan import MEMORY_ADAMW_MIN, MEMORY_ZO_MAX, STEP_RATIO_MAX, VARIANT_LABELS, Budget
from ray_s2p.bench.common import machine_info


# ----------------------------------------------------------------- Markdown
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.0f} M" if n >= 1e7 else f"{n / 1e6:.2f} M"


def _cell(text: str) -> str:
    """A table cell: a bare | would end it."""
    return text.replace("|", "\\|")


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _not_ok(r: dict[str, Any]) -> str:
    """The cell of a check that did not produce numbers: its status and why."""
    return _cell(f"{r['status']}: {r.get('reason') or r.get('error') or ''}".strip().rstrip(":"))


def _ratio(value: float | None, met: bool | None) -> str:
    return "-" if value is None else f"{value:.2f}x ({'met' if met else 'NOT met'})"


def _variant_cell(variant: dict[str, Any] | None) -> str:
    if not variant or variant.get("ratio") is None:
        return "n/a" if not variant else f"n/a ({variant.get('error', 'not run')})"
    return f"{_ms(variant['step_s'])} ({variant['ratio']:.2f}x)"


def _step_table(records: list[dict[str, Any]], device: torch.device) -> list[str]:
    labels = list(VARIANT_LABELS.values())
    lines = [f"Step overhead: median of one zeroth-order step (update + probes at +-rho) over two bare forwards; "
             f"target ratio <= {STEP_RATIO_MAX[device.type]}x.", "",
             "| model | precision | batch | params | two forwards | " + " | ".join(labels) + " | met |",
             "|---" * (6 + len(labels)) + "|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['precision']} | {_not_ok(r)} |" + " - |" * (3 + len(labels)))
            continue
        cells = [_variant_cell(r["variants"].get(k)) for k in VARIANT_LABELS]
        met = sum(bool(v) for v in r["met"].values())
        lines.append(f"| {r['model']} | {r['precision']} | {'x'.join(map(str, r['batch_shape']))} | "
                     f"{_count(r['parameters'])} | {_ms(r['two_forwards_s'])} | " + " | ".join(cells)
                     + f" | {met}/{len(r['met'])} |")
    return lines + [""]


def _memory_table(records: list[dict[str, Any]], device: torch.device) -> list[str]:
    basis = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "RSS high-water mark"
    lines = [f"Memory: peak = weights + the most allocated ({basis}) over what was held before the mode; "
             f"targets ZO <= {MEMORY_ZO_MAX}x inference, AdamW >= {MEMORY_ADAMW_MIN}x ZO.", "",
             "| model | precision | weights | inference | zeroth-order | AdamW | ZO / inference | AdamW / ZO |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['precision']} | {_not_ok(r)} | - | - | - | - | - |")
            continue
        modes = [r["modes"][k] for k in ("inference", "zeroth_order", "adamw")]
        cells = ["OOM" if m["oom"] else _bytes(m["peak_bytes"]) for m in modes]
        ratios, met = r.get("ratios") or {}, r.get("met") or {}
        lines.append(f"| {r['model']} | {r['precision']} | {_bytes(r['parameter_bytes'])} | " + " | ".join(cells)
                     + f" | {_ratio(ratios.get('zeroth_order_over_inference'), met.get('zeroth_order'))}"
                     + f" | {_ratio(ratios.get('adamw_over_zeroth_order'), met.get('adamw'))} |")
    return lines + [""]


def _comparison_table(records: list[dict[str, Any]]) -> list[str]:
    first = next((r for r in records if r["status"] == "ok"), records[0])
    lines = [f"Comparison: {first.get('model')} prompt-based {first.get('dataset', 'rotten_tomatoes')}, "
             f"{first.get('steps', '?')} steps, seed {first.get('seed', '?')}, {first.get('eval_size', '?')} "
             f"held-out examples, one replica in-process (wall: the training loop / the whole run with model "
             f"build and evaluations).", "",
             "| optimizer | step sizes | initial acc | final acc | final loss | wall |", "|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['optimizer']} | {_not_ok(r)} | - | - | - | - |")
            continue
        sizes = ", ".join(f"{k} {v:.3g}" for k, v in r["step_sizes"].items())
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        loop = "-" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f} s"
        lines.append(f"| {r['optimizer']} | {sizes} ({_cell(r['step_size_source'])}) | "
                     f"{_acc(r['initial_accuracy'])} | {_acc(r['final_accuracy'])} | {loss} | "
                     f"{loop} / {r['wall_s']:.0f} s |")
    return lines + [""]


def markdown(records: list[dict[str, Any]], device: torch.device, budget: Budget) -> str:
    """The summary for docs/benchmarks.md: one table per check, from this invocation's records."""
    machine = records[0]["machine"] if records else machine_info()
    where = machine.get("cuda_device") or f"CPU ({machine.get('cpu_count')} cores)"
    stamp = records[0]["time"][:10] if records else ""
    quick = "quick smoke test, " if records and records[0]["quick"] else ""
    lines = [f"GPU check ({quick}{where}, torch {machine.get('torch')}, {stamp}; `python jobs/gpu_check.py`, "
             f"{budget.elapsed():.0f} s in all).", ""]
    by_check = {name: [r for r in records if r["check"] == name] for name in ("step_overhead", "memory", "comparison")}
    if by_check["step_overhead"]:
        lines += _step_table(by_check["step_overhead"], device)
    if by_check["memory"]:
        lines += _memory_table(by_check["memory"], device)
    if by_check["comparison"]:
        lines += _comparison_table(by_check["comparison"])
    return "\n".join(lines)


