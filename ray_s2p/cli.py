"""The ``ray-s2p`` command line: train, replay, tune, bench, plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import ConfigError, load_config


def _offline_defaults() -> None:
    # Runs use local assets unless the user says otherwise; Ray usage stats stay off.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _train(args: argparse.Namespace) -> int:
    from .driver import train
    from .run_dir import RunDirectory

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; drop --config")
        config = RunDirectory.load_config(Path(args.resume))
        if args.set:  # e.g. a different cluster.replicas on resume (see docs/config.md)
            config = config.replace(dict(_parse_sets(args.set)))
        run_dir = Path(args.resume)
    else:
        config = load_config(args.config, args.set)
        run_dir = Path(args.output or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.address:
        config = config.replace({"cluster.address": args.address})
    print(f"ray-s2p: training {config.task.model} on {config.task.dataset} with {config.optimizer.name}, "
          f"{config.cluster.replicas} replicas ({config.cluster.mode} mode), {config.steps} steps -> {run_dir}",
          file=sys.stderr)
    result = train(config, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    s = result.summary
    before, after = s.get("initial_metrics", {}), s.get("final_metrics", {})
    print("\nbefore -> after (held-out):")
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        print(f"  {key:16s} {b if b is None else round(b, 4)!s:>10} -> {a if a is None else round(a, 4)!s:>10}")
    print(f"wall {s['wall_seconds']:.1f}s, {s['steps_completed']} steps, {s['forward_passes']} forward passes, "
          f"{s['bytes_sent_per_step'] + s['bytes_received_per_step']:.0f} bytes/step on the wire")
    print(f"final digest {result.final_digest}")
    print(f"outputs: {result.run_dir} (final/ model, ledger.parquet, metrics.parquet, summary.json)")
    return 0


def _parse_sets(items: Sequence[str]) -> list[tuple[str, object]]:
    from .config import parse_override
    return [parse_override(i) for i in items]


def _replay(args: argparse.Namespace) -> int:
    from .replay import replay_run

    result = replay_run(args.run_dir, args.step)
    out = {"step": result.step, "digest": result.digest, "seconds": round(result.seconds, 4)}
    summary_file = Path(args.run_dir) / "summary.json"
    expected = json.loads(summary_file.read_text()).get("final_digest") if summary_file.exists() else None
    if args.check:
        out["expected"] = expected
        out["match"] = expected is not None and expected == result.digest
    if args.output:
        result.engine.save_final(Path(args.output))
        out["output"] = str(args.output)
    print(json.dumps(out))
    if args.check and not out["match"]:
        print("replay digest differs from the run's final digest" if expected else
              "the run has no summary.json final digest to check against", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-s2p", description="Zeroth-order (S2P/VS2P) training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run")
    t.add_argument("--config", help="YAML config (default: the embedded default job)")
    t.add_argument("--output", help="run directory (default: runs/run-TIMESTAMP)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.set_defaults(func=_train)

    r = sub.add_parser("replay", help="rebuild a run's parameters from its ledger and print the digest")
    r.add_argument("run_dir")
    r.add_argument("--step", type=int, help="replay up to this step (default: the last)")
    r.add_argument("--output", help="save the replayed model here")
    r.add_argument("--check", action="store_true", help="exit 1 unless the digest equals the run's final digest")
    r.set_defaults(func=_replay)

    from . import cli_extra
    cli_extra.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ray-s2p`` and ``python -m ray_s2p``."""
    _offline_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"ray-s2p {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
