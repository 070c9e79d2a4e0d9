"""``ray-s2p bench``: the benchmarks of bench/ (step cost, scaling, traffic, memory, recovery, replay, driver, precision)."""

from __future__ import annotations

import argparse


def _bench(args: argparse.Namespace) -> int:
    from ..bench.runner import run_benches

    return run_benches(args.names, results=args.results, config_file=args.config, sets=args.set,
                       steps=args.steps, repeats=args.repeats,
                       cases=[c for c in (args.cases or "").split(",") if c])


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``bench`` to the ``ray-s2p`` sub-commands."""
    from ..bench.runner import BENCHES

    p = sub.add_parser("bench", help="benchmarks: step cost, scaling, traffic, memory, recovery, replay, driver, precision",
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
    p.add_argument("--cases", metavar="A,B", help="models to run: driver of smoke, llama-tiny, llama-1b "
                                                  "(default: smoke,llama-1b); precision of minilm, llama-tiny, "
                                                  "llama-1b (default: minilm,llama-1b)")
    p.set_defaults(func=_bench)
