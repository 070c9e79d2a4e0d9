"""``ray-s2p train`` (fresh or ``--resume``), ``replay`` and ``eval``: one run directory at a time."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Sequence

from ..config import FIRST_ORDER, ConfigError, load_config
from ..errors import RayS2PError

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..storage_fs import Location


def _train(args: argparse.Namespace) -> int:
    from ..distributed.driver import train
    from ..distributed.run_dir import RunDirectory
    from ..storage_fs import for_replica, location

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; drop --config")
        if args.resume is True and not args.output:
            raise RayS2PError("--resume without RUN_DIR continues the run in --output. Fix: name the run, "
                              "as --resume RUN_DIR or --output RUN_DIR --resume")
        if args.resume is not True and args.output and for_replica(location(args.output)) != for_replica(location(args.resume)):
            raise RayS2PError(f"--resume {args.resume} and --output {args.output} name two runs. Fix: give one")
        run_dir = location(args.output if args.resume is True else args.resume)
        saved = config = RunDirectory.load_config(run_dir)
        if args.set:  # e.g. a different cluster.replicas on resume (see docs/config.md)
            config = config.replace(dict(_parse_sets(args.set)))
        done = _finished(run_dir, config.steps) if _same_trajectory(saved, config) else None
        if done is not None:  # nothing to train: say so instead of starting Ray (another trajectory is refused there)
            print(f"ray-s2p: {run_dir} is complete: {done['steps_completed']} of {config.steps} steps, final digest "
                  f"{done.get('final_digest')}. Nothing to do. To train on, raise the step count: --resume "
                  f"{run_dir} --set steps=N", file=sys.stderr)
            return 0
    else:
        config = load_config(args.config, args.set)
        run_dir = location(args.output or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.address:
        config = config.replace({"cluster.address": args.address})
    from ..tasks import describe
    print(f"ray-s2p: training {describe(config.task)} with {config.optimizer.name}, "
          f"{_count(config.cluster.replicas, 'replica')} ({config.cluster.mode} mode), {config.steps} steps"
          f"{_scaling_note(config)} -> {run_dir}", file=sys.stderr)
    result = train(config, run_dir, resume=bool(args.resume), overwrite=args.overwrite, verbose=args.verbose)
    s = result.summary
    before, after = s.get("initial_metrics", {}), s.get("final_metrics", {})
    print("\nbefore -> after (held-out):")
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        print(f"  {key:16s} {b if b is None else round(b, 4)!s:>10} -> {a if a is None else round(a, 4)!s:>10}")
    print(f"wall {s['wall_seconds']:.1f}s of training (from the replicas being up; start-up took "
          f"{s['startup_seconds']:.1f}s more), {s['steps_completed']} steps, {s['forward_passes']} forward passes, "
          f"{s['bytes_sent_per_step'] + s['bytes_received_per_step']:.0f} bytes/step of probe messages (JSON length)")
    print(f"final digest {result.final_digest}")
    print(f"outputs: {result.run_dir} (final/ model, ledger.parquet, metrics.parquet, summary.json)")
    return 0


def _count(n: int, noun: str) -> str:
    """"1 replica", "2 replicas"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _same_trajectory(a: "RunConfig", b: "RunConfig") -> bool:
    from ..distributed.checkpoint import config_fingerprint
    return config_fingerprint(a.to_dict()) == config_fingerprint(b.to_dict())


def _finished(run_dir: "Location", steps: int) -> dict | None:
    """The run's summary.json when it holds a finished run of at least ``steps`` steps, else None."""
    file = run_dir / "summary.json"
    if not file.exists():
        return None
    try:
        summary = json.loads(file.read_text())
    except ValueError:
        return None  # a damaged summary: the resume path decides from the checkpoints and the ledger
    return summary if int(summary.get("steps_completed", 0)) >= steps else None


def _scaling_note(config: "RunConfig") -> str:
    """", step x4 (16 directions per step, step_scaling linear from 4)" where the step scaling moves the step."""
    o = config.optimizer
    if o.name in FIRST_ORDER:
        return ""
    from ..zo.rules import StepScaling
    q = config.directions_per_step
    factor = StepScaling(o.step_scaling, o.tuned_directions).factor(q)
    return "" if factor == 1.0 else (f", step x{factor:.3g} ({q} directions per step, step_scaling {o.step_scaling} "
                                     f"from {o.tuned_directions})")


def _parse_sets(items: Sequence[str]) -> list[tuple[str, object]]:
    from ..config_parse import parse_override
    return [parse_override(i) for i in items]


def _replay(args: argparse.Namespace) -> int:
    from ..distributed.replay import compare_to_run, replay_run
    from ..storage_fs import export, location

    if args.check and args.atol is not None:
        raise RayS2PError("--check compares digests bit for bit and --atol within a tolerance. Fix: use one of them")
    from ..distributed.replica import quiet_libraries
    with quiet_libraries():  # the model's load report ("newly initialized" heads) is about the start, not the run
        result = replay_run(args.run_dir, args.step, bitwise=args.check)
    out = {"step": result.step, "digest": result.digest, "seconds": round(result.seconds, 4)}
    if args.atol is not None:
        compared = compare_to_run(args.run_dir, result.engine, result.step)
        out.update(compared, atol=args.atol, within=compared["max_abs_diff"] <= args.atol)
    summary_file = location(args.run_dir) / "summary.json"
    expected = json.loads(summary_file.read_text()).get("final_digest") if summary_file.exists() else None
    if args.check:
        out["expected"] = expected
        out["match"] = expected is not None and expected == result.digest
    if args.output:
        export(result.engine.save_final, location(args.output))
        out["output"] = str(args.output)
    print(json.dumps(out))
    if args.check and not out["match"]:
        print("replay digest differs from the run's final digest" if expected else
              "the run has no summary.json final digest to check against", file=sys.stderr)
        return 1
    if args.atol is not None and not out["within"]:
        print(f"replayed parameters differ from the run's ({out['reference']}) by up to {out['max_abs_diff']:.3g}, "
              f"more than --atol {args.atol:g}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..distributed.checkpoint import latest_checkpoint
    from ..distributed.engine import ReplicaEngine
    from ..distributed.replay import replay_run
    from ..distributed.replica import quiet_libraries
    from ..distributed.run_dir import RunDirectory
    from ..storage_fs import for_replica, location, write_json
    from ..tasks.metrics import eval_metrics
    if args.run_dir and args.run and args.run_dir != args.run:
        raise RayS2PError(f"eval {args.run_dir} --run {args.run} names two runs. Fix: give one (eval RUN_DIR)")
    if not (args.run_dir or args.run):
        raise RayS2PError("eval needs the run directory. Fix: ray-s2p eval RUN_DIR [--step K]")
    run_dir = location(args.run_dir or args.run)
    config = RunDirectory.load_config(run_dir)
    with quiet_libraries():  # the model's load report ("newly initialized" heads) is about the start, not the run
        if config.optimizer.name in FIRST_ORDER:
            ckpt = latest_checkpoint(run_dir / "checkpoints")
            if ckpt is None:
                raise RayS2PError(f"{str(run_dir)!r} has no checkpoint to evaluate")
            engine = ReplicaEngine(config.replace({"cluster.use_ray": False}))
            engine.load_checkpoint(for_replica(ckpt.path))
            step = ckpt.step
        else:
            replayed = replay_run(run_dir, args.step)
            engine, step = replayed.engine, replayed.step
    metrics = eval_metrics([engine.evaluate(0, 1)])
    out = {"step": step, "digest": engine.digest(), **metrics}
    # eval.json is the final parameters' evaluation; an earlier step gets its own file beside it.
    name = "eval.json" if args.step is None else f"eval-step-{step}.json"
    write_json((location(args.storage) if args.storage else run_dir) / name, out)
    print(json.dumps(out))
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``train``, ``replay`` and ``eval`` to the ``ray-s2p`` sub-commands."""
    t = sub.add_parser(
        "train", help="train or resume a run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with forward passes only (S2P, VS2P, MeZO and the other rules), on Ray replicas "
                    "or in-process, into a run directory (config.yaml, ledger.parquet, metrics.parquet, checkpoints/, "
                    "final/, summary.json). Every config key, its default and meaning: docs/config.md.",
        epilog="examples:\n"
               "  ray-s2p train                                  # the embedded default job\n"
               "  ray-s2p train --config jobs/configs/smoke.yaml --output runs/smoke\n"
               "  ray-s2p train --set optimizer.eta=2 --set cluster.replicas=4   # --set repeats\n"
               "  ray-s2p train --resume runs/smoke             # continue from its newest checkpoint")
    t.add_argument("--config", help="YAML config (default: the embedded default job)")
    t.add_argument("--output", help="run directory: a path, or a URI such as s3://bucket/runs/x or "
                                    "file:///data/runs/x (default: runs/run-TIMESTAMP)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key, e.g. optimizer.eta=2 (repeat --set for more keys; "
                        "docs/config.md lists them)")
    t.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (a path or URI; without one, the run in --output) from its "
                        "newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument("--verbose", action="store_true", help="show Ray's start-up lines and the replicas' library "
                                                          "output (default: RUN_DIR/logs/replica-N.log)")
    t.set_defaults(func=_train)

    r = sub.add_parser("replay", help="rebuild a run's parameters from its ledger and print the digest")
    r.add_argument("run_dir", help="run directory (a path or URI)")
    r.add_argument("--step", type=int, help="replay up to this step (default: the last)")
    r.add_argument("--output", help="save the replayed model here")
    r.add_argument("--check", action="store_true", help="exit 1 unless the digest equals the run's final digest "
                                                        "(refused where the run recorded another device or torch)")
    r.add_argument("--atol", type=float, metavar="TOL", help="compare the replayed parameters with the run's "
                   "(its checkpoint of --step, or final/) and exit 1 if any differs by more than TOL")
    r.set_defaults(func=_replay)

    p = sub.add_parser("eval", help="evaluate a run's parameters at a step on the held-out set")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory (a path or URI)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # the earlier spelling of RUN_DIR, still accepted
    p.add_argument("--step", type=int, help="replay the ledger to this step first (default: the last); the result "
                                            "goes to eval-step-STEP.json, beside the final eval.json")
    p.add_argument("--storage", help="directory or URI where the eval file goes (default: the run directory)")
    p.set_defaults(func=_eval)
