"""Sub-commands beyond train/replay (tune, plot, bench): registered here to keep cli.py short."""

from __future__ import annotations

import argparse
from pathlib import Path


def _tune(args: argparse.Namespace) -> int:
    import ray

    from .config import load_config
    from .tune import run_sweep

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


def add_tune_command(sub: "argparse._SubParsersAction") -> None:
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


def _eval(args: argparse.Namespace) -> int:
    import json

    from .checkpoint import latest_checkpoint
    from .engine import ReplicaEngine
    from .files import write_json
    from .replay import replay_run
    from .run_dir import RunDirectory, aggregate_eval

    run_dir = Path(args.run)
    config = RunDirectory.load_config(run_dir)
    if config.optimizer.name in ("sgd", "adamw"):
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise ValueError(f"{str(run_dir)!r} has no checkpoint to evaluate")
        engine = ReplicaEngine(config.replace({"cluster.use_ray": False}))
        engine.load_trainable(ckpt.tensors, ckpt.step)
        step = ckpt.step
    else:
        replayed = replay_run(run_dir, args.step)
        engine, step = replayed.engine, replayed.step
    metrics = aggregate_eval([engine.evaluate(0, 1)])
    out = {"step": step, "digest": engine.digest(), **metrics}
    write_json(Path(args.storage or run_dir) / "eval.json", out)
    print(json.dumps(out))
    return 0


def add_eval_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("eval", help="evaluate a run's parameters at a step on the held-out set")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--step", type=int, help="replay the ledger to this step first (default: the last)")
    p.add_argument("--storage", help="where eval.json goes (default: the run directory)")
    p.set_defaults(func=_eval)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_benches

    return run_benches(args.names, results=args.results, config_file=args.config, sets=args.set,
                       steps=args.steps, repeats=args.repeats)


def add_bench_command(sub: "argparse._SubParsersAction") -> None:
    from .bench import BENCHES

    p = sub.add_parser("bench", help="benchmarks: step cost, scaling, traffic, memory, recovery, replay",
                       description="Each benchmark prints one JSON line and appends it to --results. "
                                   "Base config: MiniLM, all parameters, batch 16 x 64 tokens (see ray_s2p/bench.py).")
    # Names are checked by run_benches (argparse's choices reject the empty default of nargs='*').
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHES)} (default: all)")
    p.add_argument("--results", default="bench_results.jsonl", metavar="FILE.jsonl",
                   help="JSON-lines file the results are appended to (default: bench_results.jsonl)")
    p.add_argument("--config", help="YAML config used as is (default: the benchmark base config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (wins over the benchmarks' own settings)")
    p.add_argument("--steps", type=int, help="training steps of the Driver runs (default: scaling/traffic 6, "
                                             "recovery 12, replay 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement after one warm-up")
    p.set_defaults(func=_bench)


def _compare(args: argparse.Namespace) -> int:
    import ray

    from .compare import ALL_OPTIMIZERS, compare
    from .config import load_config

    config = load_config(args.config, args.set)
    if not ray.is_initialized():
        ray.init(address=args.address) if args.address else ray.init()
    variants = args.optimizers.split(",") if args.optimizers else ALL_OPTIMIZERS
    compare(config, args.output, variants=variants, budget=args.budget, trials=args.trials,
            seeds=[int(s) for s in args.seeds.split(",")], target=args.target, ablations=not args.no_ablations,
            resume=args.resume)
    print((Path(args.output) / "summary.md").read_text())
    return 0


def add_compare_command(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("compare", help="equal-budget optimizer comparison: Tune each, rerun the best over seeds")
    p.add_argument("--config", required=True, help="base YAML config (the task)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output", required=True, help="directory for results.parquet, summary.md, curves.png")
    p.add_argument("--optimizers", help="comma-separated variants (default: all, see ray_s2p.compare)")
    p.add_argument("--budget", type=int, required=True, help="forward passes per run")
    p.add_argument("--trials", type=int, default=4, help="tuning trials per optimizer")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds for the final runs")
    p.add_argument("--target", type=float, default=0.8, help="accuracy whose forward-pass cost is reported")
    p.add_argument("--no-ablations", action="store_true", help="skip the VS2P ablations")
    p.add_argument("--resume", action="store_true",
                   help="continue in --output: restore finished Tune sweeps, reuse finished runs of the same config")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=_compare)


def add_commands(sub: "argparse._SubParsersAction") -> None:
    """Register the optional sub-commands (each imports its heavy modules lazily)."""
    from .plot import add_plot_command

    add_tune_command(sub)
    add_compare_command(sub)
    add_eval_command(sub)
    add_plot_command(sub)
    add_bench_command(sub)
