"""GPU check: step overhead, memory and a short optimizer comparison on one GPU, in one command.

    python jobs/gpu_check.py --results gpu_check.jsonl [--summary gpu_check.md] [--time-budget 450]
    python jobs/gpu_check.py --quick --device cpu        # CPU smoke test of this script (tiny models)

Checks (one JSON line each, printed and appended to ``--results``; then a
Markdown summary for docs/benchmarks.md on stdout; progress goes to stderr):

1. ``step_overhead``: median wall time (``torch.cuda.synchronize`` around each
   timing) of two bare forwards against one full zeroth-order step (the previous
   step's update plus probes at +rho and -rho, through ``ReplicaEngine``) for
   Gaussian (generator and Philox-kernel noise), Rademacher and low-rank directions,
   and the naive in-place MeZO step;
   ``ratio`` = step / two forwards (target <= 1.1 on a GPU, 1.3 on CPU).
   Models: SmolLM2-135M (prompt_classification, trainable all, random 16 x 64
   tokens) and a randomly initialised Llama (``LLAMA_1B``, ~1 B parameters, built
   in memory and never saved) on random 16 x 128 tokens, in fp32, bf16 weights,
   and fp32 weights with bf16 autocast (the project's ``task.autocast: bf16``).
2. ``memory``: ``torch.cuda.max_memory_allocated`` (reset before each mode) for
   plain inference, a zeroth-order step and first-order AdamW (forward, backward,
   step) on the Llama in fp32 and bf16; targets ZO <= 1.2x inference and AdamW >=
   3x ZO. Out-of-memory is caught and reported per mode.
3. ``comparison``: ``ray_s2p.distributed.driver.train`` in-process (no Ray, one replica, one
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
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

# isort: off
# gpu_check_plan first: it sets the offline environment before torch and transformers load.
from gpu_check_plan import (CHECK_NAMES, DEFAULT_CONFIG, LLAMA_PRECISIONS, MEMORY_PRECISIONS,  # noqa: E402
                            Budget, BudgetExceeded, Plan)
import torch  # noqa: E402

from gpu_check_checks import (Comparison, LlamaHolder, free_memory, oom_errors, step_llama,  # noqa: E402
                              step_lm)
from gpu_check_memory import memory_llama  # noqa: E402
from gpu_check_report import markdown  # noqa: E402
from ray_s2p.bench.common import emit, log, machine_info  # noqa: E402
from ray_s2p.config import load_config  # noqa: E402
# isort: on


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
    budget = Budget(args.time_budget, START)
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
