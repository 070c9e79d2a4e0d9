"""``ray-s2p tune`` and ``compare``: Ray Tune searches and equal-budget optimizer comparisons (sweeps/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _tune(args: argparse.Namespace) -> int:
    import ray

    from ..config import load_config
    from ..sweeps.tune import run_sweep

    config = load_config(args.config, args.set)
    if not ray.is_initialized():
        ray.init(address=args.address) if args.address else ray.init()
    result = run_sweep(config, args.storage, name=args.name,
                       optimizers=args.optimizers.split(",") if args.optimizers else None,
                       trials_per_optimizer=args.trials, budget=args.budget, metric=args.metric,
                       asha=not args.no_asha, driver_cpus=args.driver_cpus, restore=args.restore, seed=args.seed)
    pq_path, md_path = result.write_tables(Path(args.storage) / args.name)
    print(md_path.read_text())
    print(f"tables: {pq_path} and {md_path}")
    failed = [r for r in result.rows if r.get("error")]
    return 1 if failed and len(failed) == len(result.rows) else 0


def _compare(args: argparse.Namespace) -> int:
    import ray

    from ..config import load_config
    from ..sweeps.compare import ALL_OPTIMIZERS, compare

    config = load_config(args.config, args.set)
    if not ray.is_initialized():
        ray.init(address=args.address) if args.address else ray.init()
    variants = args.optimizers.split(",") if args.optimizers else ALL_OPTIMIZERS
    compare(config, args.output, variants=variants, budget=args.budget, trials=args.trials,
            seeds=[int(s) for s in args.seeds.split(",")], target=args.target, ablations=not args.no_ablations,
            resume=args.resume)
    print((Path(args.output) / "summary.md").read_text())
    return 0


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
    p.add_argument("--restore", action="store_true", help="resume an interrupted sweep (Tuner.restore)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trial sampler")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=_tune)

    p = sub.add_parser("compare", help="equal-budget optimizer comparison: Tune each, rerun the best over seeds")
    p.add_argument("--config", required=True, help="base YAML config (the task)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output", required=True, help="directory for results.parquet, summary.md, curves.png")
    p.add_argument("--optimizers", help="comma-separated variants (default: all, see ray_s2p.sweeps.compare)")
    p.add_argument("--budget", type=int, required=True, help="forward passes per run")
    p.add_argument("--trials", type=int, default=4, help="tuning trials per optimizer")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds for the final runs")
    p.add_argument("--target", type=float, default=0.8, help="accuracy whose forward-pass cost is reported")
    p.add_argument("--no-ablations", action="store_true", help="skip the VS2P ablations")
    p.add_argument("--resume", action="store_true",
                   help="continue in --output: restore finished Tune sweeps, reuse finished runs of the same config")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=_compare)
