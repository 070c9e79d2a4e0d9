"""``ray-s2p tune`` and ``compare``: Ray Tune searches and equal-budget optimizer comparisons (sweeps/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tune(args: argparse.Namespace) -> int:
    import ray

    from ..config import load_config
    from ..sweeps.tune import error_line, run_sweep

    config = load_config(args.config, args.set)
    if not ray.is_initialized():
        ray.init(address=args.address) if args.address else ray.init()
    result = run_sweep(config, args.storage, name=args.name,
                       optimizers=args.optimizers.split(",") if args.optimizers else None,
                       trials_per_optimizer=args.trials, budget=args.budget, metric=args.metric,
                       asha=not args.no_asha, driver_cpus=args.driver_cpus, restore=args.resume, seed=args.seed)
    pq_path, md_path = result.write_tables(Path(args.storage) / args.name)
    print(md_path.read_text())
    print(f"tables: {pq_path} and {md_path}")
    failed = result.failed()
    lines = [f"{r['optimizer']} " + ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" for k, v in sorted(r.items())
                                              if k.startswith("optimizer.") and isinstance(v, float))
             + f": {error_line(r['error'])}" for r in failed]
    return _failed("tune", f"{len(failed)} of {len(result.rows)} trials failed", lines)


def _failed(command: str, counts: str, lines: list[str]) -> int:
    """Exit status of a sweep: 0, or 1 with one summary line on stderr when anything failed (issue 16)."""
    if not lines:
        return 0
    first = " ".join(lines[0].split())[:200]
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    print(f"ray-s2p {command}: {counts}; first: {first}{more}", file=sys.stderr)
    return 1


def _step_ranges(items: list[str]) -> dict[str, tuple[float, float]]:
    """``--range NAME=LOW:HIGH`` values as {variant: (low, high)}.

    Raises:
        SystemExit: a value that is not NAME=LOW:HIGH with 0 < LOW < HIGH.
    """
    ranges = {}
    for item in items:
        name, _, span = item.partition("=")
        low, _, high = span.partition(":")
        try:
            lo, hi = float(low), float(high)
        except ValueError:
            lo = hi = -1.0
        if not name or not 0 < lo < hi:
            raise SystemExit(f"compare: --range {item!r}: expected NAME=LOW:HIGH with 0 < LOW < HIGH, "
                             f"e.g. --range vs2p=0.01:3")
        ranges[name] = (lo, hi)
    return ranges


def _compare(args: argparse.Namespace) -> int:
    import ray

    from ..config import load_config
    from ..sweeps.compare import compare, default_variants

    config = load_config(args.config, args.set)
    if not ray.is_initialized() and not args.report_only:
        ray.init(address=args.address) if args.address else ray.init()
    if args.optimizers:
        variants = args.optimizers.split(",")
    else:
        variants, left_out = default_variants(config)
        if left_out:
            print(f"compare: {left_out} (name it in --optimizers to run it anyway)", file=sys.stderr)
    result = compare(config, args.output, variants=variants, budget=args.budget, trials=args.trials,
                     seeds=[int(s) for s in args.seeds.split(",")], target=args.target,
                     ablations=not args.no_ablations, resume=args.resume, eval_points=args.eval_points,
                     parallel_runs=args.parallel_runs, trial_cpus=args.trial_cpus,
                     progress=args.progress, train=not args.report_only, step_ranges=_step_ranges(args.range))
    summary = Path(args.output) / "summary.md"
    if summary.is_file():
        print(summary.read_text())
    for line in result.missing:  # left out of the reports: a later run without --report-only trains them
        print(f"compare --report-only: {line}; left out", file=sys.stderr)
    trials = [t for tuned in result.tuned for t in tuned.trials]
    counts = (f"{sum(1 for t in trials if t.get('error'))} of {len(trials)} tuning trials and "
              f"{sum(1 for r in result.rows if r.get('error'))} of {len(result.rows)} runs failed")
    skipped = [t.name for t in result.tuned if t.overrides is None]
    if skipped:
        counts += f" ({', '.join(skipped)} not rerun)"
    return _failed("compare", counts, result.failures)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``tune`` and ``compare`` to the ``ray-s2p`` sub-commands."""
    p = sub.add_parser("tune", help="Ray Tune search over optimizer settings (equal-budget comparison)")
    p.add_argument("--config", help="base YAML config (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", required=True, help="Tune storage path (local directory or cloud URI)")
    p.add_argument("--name", default="sweep", help="experiment name under --storage")
    p.add_argument("--optimizers", help="comma-separated optimizers to compare (default: the config's)")
    p.add_argument("--trials", type=int, default=4, help="trials per optimizer (equal tuning effort)")
    p.add_argument("--budget", type=int, help="forward passes per trial (equal budget); default: config steps")
    p.add_argument("--metric", help="metric to optimise (default eval_accuracy, or eval_loss for causal_lm)")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    p.add_argument("--driver-cpus", type=float, default=1.0, help="CPUs reserved per trial for its driver")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --output (Tuner.restore)")
    p.add_argument("--restore", dest="resume", action="store_true", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--seed", type=int, default=0, help="seed of the trial sampler")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=_tune)

    p = sub.add_parser("compare", help="equal-budget optimizer comparison: tune each on validation, rerun the "
                                        "best over seeds on test (needs task.test_size)")
    p.add_argument("--config", required=True, help="base YAML config (the task)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output", required=True,
                   help="directory for results.parquet, summary.md, tuning.md, tuning.parquet, curves.png")
    p.add_argument("--optimizers", help="comma-separated variants (default: every rule once, "
                   "ray_s2p.sweeps.compare.default_variants; zo_sign = s2p_opt1 and s2p_opt2 = mezo are aliases, "
                   "and with one direction per step random_search is s2p_opt1 at twice the lr)")
    p.add_argument("--budget", type=int, required=True, help="forward passes per run")
    p.add_argument("--trials", type=int, default=5,
                   help="log-spaced step sizes per optimizer before any edge extension (the protocol asks >= 5)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds for the final runs")
    p.add_argument("--target", type=float, default=0.8,
                   help="test accuracy whose forward-pass cost is reported (interpolated)")
    p.add_argument("--eval-points", type=int, default=25,
                   help="evaluations per curve at least; the interval is the same for every optimizer")
    p.add_argument("--no-ablations", action="store_true", help="skip the VS2P ablations")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="first grid of a variant's step size over LOW..HIGH instead of its default range "
                        "(repeat for more variants); the edge extensions and the refinement follow as usual")
    p.add_argument("--parallel-runs", type=_positive, default=1, metavar="N",
                   help="seeds of a rule trained at once, each a one-CPU Ray task (default 1: one after another "
                        "in this process)")
    p.add_argument("--trial-cpus", type=float, default=1.0, metavar="N",
                   help="CPUs each tuning trial reserves (default 1: as many trials at once as the cluster has "
                        "CPUs; on a small machine one trial with every CPU can finish sooner than several with one)")
    p.add_argument("--resume", action="store_true",
                   help="continue in --output: take finished sweeps and runs of the same inputs from the progress "
                        "file, else restore finished Tune sweeps and reuse finished run directories")
    p.add_argument("--progress", metavar="FILE",
                   help="progress file recording every finished sweep and run, a few KB each (default "
                        "OUTPUT/progress.json); copied to another machine, --resume continues from it there")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write summary.md, tuning.md and curves.png from what the progress file "
                        "(and finished run directories) hold, naming every rule left out because part of it is "
                        "not recorded")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=_compare)
