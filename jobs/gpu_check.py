"""GPU check: step overhead, memory and a short optimizer comparison on one GPU, in one command.

    python jobs/gpu_check.py --results gpu_check.jsonl [--summary gpu_check.md] [--time-budget 450]
    python jobs/gpu_check.py --quick --device cpu        # CPU smoke test of this script (tiny models)

Checks (one JSON line each, printed and appended to ``--results``; then a
Markdown summary for docs/benchmarks.md on stdout; progress goes to stderr):

1. ``step_overhead``: median wall time (``torch.cuda.synchronize`` around each
   timing) of two bare forwards against one full zeroth-order step (the previous
   step's update plus probes at +rho and -rho, through ``ReplicaEngine``) for
   hooks+gaussian, swap+gaussian, hooks+table, and the naive in-place MeZO step;
   ``ratio`` = step / two forwards (target <= 1.1 on a GPU, 1.3 on CPU).
   Models: SmolLM2-135M (prompt_classification, trainable all, random 16 x 64
   tokens) and a randomly initialised Llama (``LLAMA_1B``, ~1 B parameters, built
   in memory and never saved) on random 16 x 128 tokens, in fp32, bf16 weights,
   and fp32 weights with bf16 autocast (the project's ``task.precision: bf16``).
2. ``memory``: ``torch.cuda.max_memory_allocated`` (reset before each mode) for
   plain inference, a zeroth-order step and first-order AdamW (forward, backward,
   step) on the Llama in fp32 and bf16; targets ZO <= 1.2x inference and AdamW >=
   3x ZO. Out-of-memory is caught and reported per mode.
3. ``comparison``: ``ray_s2p.driver.train`` in-process (no Ray, one replica, one
   GPU) on jobs/configs/smollm2_prompt_rt.yaml: VS2P, MeZO and ZO-SGD-Sign with
   the same seed and step budget; initial/final held-out accuracy and wall time.

``--quick`` shrinks everything (tiny-gpt2, a 2-layer width-64 Llama, 3 steps,
one repeat) so the script can be smoke-tested on a CPU. Without ``--quick`` the
script needs CUDA and exits with code 2 when there is none. ``--time-budget``
(seconds from the interpreter's start) skips a check whose estimate no longer
fits, and a SIGALRM stops a check that overruns the budget; both are reported as
lines with ``status`` ``skipped`` / ``timeout``. Exit code: 0, or 1 when a check
failed with an error.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts the imports too: they are part of the 8 minutes

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, Sequence  # noqa: E402

# The GPU machine has no internet: a library reaching for the hub would stall on network timeouts.
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)

import _common  # noqa: E402,F401  (puts the repository root on sys.path)
import torch  # noqa: E402

from ray_s2p.bench import emit, log, machine_info, median_seconds  # noqa: E402
from ray_s2p.bench_memory import _vm_hwm, current_rss, reset_peak_rss  # noqa: E402
from ray_s2p.bench_step import FixedBatchTask, engine_step_fn, naive_mezo_fn  # noqa: E402
from ray_s2p.config import RunConfig, load_config  # noqa: E402
from ray_s2p.engine import ReplicaEngine  # noqa: E402
from ray_s2p.perturbation import mix_seed, select_parameters  # noqa: E402

ROOT = _common.ROOT
DEFAULT_CONFIG = ROOT / "jobs" / "configs" / "smollm2_prompt_rt.yaml"
CHECK_SEED = 0x6C0C  # seeds of this script's own model init and token batches (never the global RNG)

# The engine step variants of check 1 (mechanism, distribution); naive MeZO is timed separately.
VARIANTS = (("hooks", "gaussian"), ("swap", "gaussian"), ("hooks", "table"))
VARIANT_LABELS = {"hooks_gaussian": "hooks+gaussian", "swap_gaussian": "swap+gaussian", "hooks_table": "hooks+table",
                  "naive_mezo": "naive MeZO"}
STEP_RATIO_MAX = {"cuda": 1.1, "cpu": 1.3}
MEMORY_ZO_MAX, MEMORY_ADAMW_MIN = 1.2, 3.0

# ~1.1 B in the brief's words; 16 layers with full-width key/value heads come to ~0.95 B (reported exactly).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024)
# (label, parameter dtype, autocast dtype): bf16 weights as MeZO runs them, and fp32 master weights with a
# bf16 forward, which is what this project's task.precision: bf16 does.
LLAMA_PRECISIONS = (("fp32", torch.float32, None), ("fp32+autocast_bf16", torch.float32, torch.bfloat16),
                    ("bf16", torch.bfloat16, None))
MEMORY_PRECISIONS = ("fp32", "bf16")
CHECK_NAMES = ("step", "memory", "comparison")



from gpu_check_checks import *  # noqa: E402,F401,F403  (the checks, split out to keep modules small)
from gpu_check_report import markdown  # noqa: E402


# ----------------------------------------------------------------- runner
@dataclass
class Check:
    """One line of output: what it is, its budget estimate, and the function that measures it."""

    check: str
    label: dict[str, Any]
    estimate_s: float
    body: Callable[[], dict[str, Any]]


def run_checks(checks: Sequence[Check], budget: Budget, results: str, device: torch.device, plan: Plan,
               stdout: Any) -> list[dict[str, Any]]:
    """Run (or skip) each check in order; emit one JSON line each; return the records."""
    records = []
    machine = machine_info()
    for item in checks:
        head = {"check": item.check, **item.label, "device": str(device), "quick": plan.quick,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine}
        if not budget.allows(item.estimate_s):
            record = {**head, "status": "skipped",
                      "reason": f"time budget: {budget.elapsed():.0f} s of {budget.seconds:.0f} s used, "
                                f"this check needs ~{item.estimate_s:.0f} s"}
        else:
            log(f"gpu_check: {item.check} {item.label} ({budget.elapsed():.0f} s elapsed)")
            started = time.perf_counter()
            try:
                with budget.deadline():
                    body = item.body()
                record = {**head, "status": "ok", **body}
            except BudgetExceeded as exc:
                record = {**head, "status": "timeout", "reason": str(exc)}
            except Exception as exc:  # one failing check must not hide the others' numbers
                traceback.print_exc(file=sys.stderr)
                status = "oom" if isinstance(exc, oom_errors()) else "error"
                record = {**head, "status": status, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            record["check_s"] = time.perf_counter() - started
            free_memory(device)
        records.append(record)
        emit(record, results, stream=stdout)
    return records


def plan_checks(args: argparse.Namespace, plan: Plan, device: torch.device, workdir: Path) -> list[Check]:
    """The checks of this invocation, in order (cheap and most asked-for first)."""
    base = load_config(args.config)
    if args.seed is not None:
        base = base.replace({"seed": args.seed})
    wanted = set(args.only.split(",")) if args.only else set(CHECK_NAMES)
    holder = LlamaHolder(plan, device)
    est = plan.estimates
    llama_name = "llama-tiny" if plan.quick else "llama-1b"
    checks: list[Check] = []
    if "step" in wanted:
        checks.append(Check("step_overhead", {"model": plan.lm_model, "precision": "fp32"}, est["step_lm"],
                            lambda: step_lm(base, device, plan)))
    for precision, _, _ in LLAMA_PRECISIONS:
        if "step" in wanted:
            checks.append(Check("step_overhead", {"model": llama_name, "precision": precision}, est["step_llama"],
                                lambda p=precision: step_llama(holder, p, base, device, plan)))
        if "memory" in wanted and precision in MEMORY_PRECISIONS:
            checks.append(Check("memory", {"model": llama_name, "precision": precision}, est["memory"],
                                lambda p=precision: memory_llama(holder, p, base, device, plan)))
    if "comparison" in wanted:
        comparison = Comparison(base, device, plan, workdir, args.mezo_lr, args.sign_lr)

        def train_one(name: str) -> dict[str, Any]:
            holder.release()  # the 1 B model is not needed any more: give its memory back before training
            return comparison.run(name)

        for name in ("vs2p", "mezo", "zo_sign"):
            model = plan.lm_model if plan.quick else base.task.model
            checks.append(Check("comparison", {"model": model, "optimizer": name}, est["comparison"],
                                lambda n=name: train_one(n)))
    return checks


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
        cells = [f"{_ms(r['variants'][k]['step_s'])} ({r['variants'][k]['ratio']:.2f}x)" for k in VARIANT_LABELS]
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


# ----------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="gpu_check.jsonl", help="JSON lines file to append to")
    parser.add_argument("--summary", default=None, help="also write the Markdown summary to this file")
    parser.add_argument("--time-budget", type=float, default=450.0,
                        help="seconds from start; checks that would not fit are skipped (default 450)")
    parser.add_argument("--quick", action="store_true", help="tiny models and 3 steps: a CPU smoke test")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda if visible (cpu only with --quick)")
    parser.add_argument("--only", default=None, help=f"comma list of {','.join(CHECK_NAMES)} (default all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (10; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per optimizer (300; quick 3)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the comparison's config (SmolLM2 job)")
    parser.add_argument("--seed", type=int, default=None, help="run seed of the comparison (default: the config's)")
    parser.add_argument("--mezo-lr", type=float, default=None, help="MeZO lr (default: derived from VS2P)")
    parser.add_argument("--sign-lr", type=float, default=None, help="ZO-SGD-Sign lr (default: derived from VS2P)")
    parser.add_argument("--workdir", default=None, help="keep the comparison's run directories here "
                                                        "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    if args.only and not set(args.only.split(",")) <= set(CHECK_NAMES):
        parser.error(f"--only: choose from {', '.join(CHECK_NAMES)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats: use 1 or more")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: use 1 or more")
    return args


def pick_device(args: argparse.Namespace) -> torch.device | None:
    """The device, or None (after a message on stderr) when the checks cannot run here."""
    cuda = torch.cuda.is_available()
    if args.device == "cpu" and not args.quick:
        log("gpu_check: --device cpu runs only the --quick smoke test; the full checks (a 1 B model, 300-step "
            "runs) need a GPU. Fix: add --quick, or run on the GPU machine.")
        return None
    if args.device in ("auto", "cuda") and not cuda:
        if args.device == "auto" and args.quick:
            return torch.device("cpu")
        log(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}). The GPU checks need one NVIDIA GPU. Fix: run on the GPU machine, "
            f"or use `python jobs/gpu_check.py --quick --device cpu` for the CPU smoke test.")
        return None
    return torch.device("cuda" if args.device in ("auto", "cuda") else "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    if device is None:
        return 2
    plan = Plan.make(args.quick, args.repeats, args.steps)
    if plan.quick and device.type == "cpu":
        # Tiny models gain nothing from intra-op threads, and on a busy machine the threads spin-wait
        # on each other: a width-64 forward went from 3 ms on one thread to 280 ms on two.
        torch.set_num_threads(1)
    budget = Budget(args.time_budget)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stdout = sys.stdout
    try:
        # stdout carries only the JSON lines and the summary: library prints go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            checks = plan_checks(args, plan, device, workdir)
            records = run_checks(checks, budget, args.results, device, plan, stdout)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(records, device, budget)
    print("", file=stdout)
    print(table, file=stdout, flush=True)
    if args.summary:
        Path(args.summary).write_text(table + "\n", encoding="utf-8")
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
