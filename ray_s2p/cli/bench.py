"""``ray-s2p bench``: the benchmarks of bench/ (step cost, scaling, traffic, memory, recovery, replay, driver,
precision; speedup only by name)."""

from __future__ import annotations

import argparse


def _bench(args: argparse.Namespace) -> int:
    from ..bench.runner import SPEEDUP_FLAGS, run_benches

    return run_benches(args.names, results=args.results, config_file=args.config, sets=args.set,
                       steps=args.steps, repeats=args.repeats,
                       cases=[c for c in (args.cases or "").split(",") if c],
                       speedup={key: getattr(args, key) for key in SPEEDUP_FLAGS})


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``bench`` to the ``ray-s2p`` sub-commands."""
    from ..bench.runner import BENCHES, BY_NAME_ONLY

    p = sub.add_parser("bench", help="benchmarks: step cost, scaling, traffic, memory, recovery, replay, driver, "
                                     "precision; speedup (steps to a target against directions per step)",
                       description="Each benchmark prints one JSON line and appends it to --results. "
                                   "Base config: MiniLM, all parameters, batch 16 x 64 tokens (see ray_s2p/bench/). "
                                   "speedup runs only when named and takes the options of its own group.")
    # Names are checked by run_benches (argparse's choices reject the empty default of nargs='*').
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"any of {', '.join([*BENCHES, *BY_NAME_ONLY])} (default: all but {', '.join(BY_NAME_ONLY)})")
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
    _speedup_options(p)
    p.set_defaults(func=_bench)


def _speedup_options(p: argparse.ArgumentParser) -> None:
    """The options of ``ray-s2p bench speedup`` (refused for the other benchmarks; None: not given)."""
    from ..bench.speedup import DEFAULT_OUTPUT, DEFAULT_PROGRESS, DEFAULT_REPORT, MEASURED, PRESETS, Q_VALUES

    g = p.add_argument_group("speedup", "steps to a target accuracy S(Q) against the directions per step Q "
                                        "(ray_s2p/bench/speedup.py); a long measurement runs in parts with --resume")
    g.add_argument("--tasks", metavar="A,B", help=f"presets, any of {', '.join(PRESETS)} "
                                                  f"(default: {','.join(MEASURED)})")
    g.add_argument("--q", metavar="1,2,4", help=f"directions per step (default: {','.join(map(str, Q_VALUES))})")
    g.add_argument("--phase", choices=("tune", "default", "tuned", "all", "data", "wall"),
                   help="tune: step-size multipliers on validation; default: m = 1 on test, seeds 0-2; "
                        "tuned: the picked multiplier on test; all (default): the three, Q by Q; "
                        "data: Q = 1 on an N-fold batch for each N > 1 of --q (N data-mode replicas, weak "
                        "batch scaling); wall: Ray step times, the step-cost model, the projected speed-up "
                        "and 1 against 2 Ray replicas timed to the target (run it on a quiet machine)")
    g.add_argument("--progress", metavar="FILE.json", help=f"progress file (default: {DEFAULT_PROGRESS})")
    g.add_argument("--output", metavar="DIR",
                   help=f"run directories, removed once recorded (default: {DEFAULT_OUTPUT})")
    g.add_argument("--report", metavar="FILE.md", help=f"--report-only's markdown, its figure beside it as "
                                                        f"STEM_steps.png (default: {DEFAULT_REPORT})")
    g.add_argument("--resume", action="store_true", default=None,
                   help="skip every run recorded in the progress file with the config it would have now")
    g.add_argument("--report-only", action="store_true", default=None,
                   help="train nothing; write the report and figure from the progress file")
    g.add_argument("--pilot", action="store_true", default=None,
                   help="run Q = 1 only (m = 1, seed 0, validation) and print its curve, to fix the target")
    g.add_argument("--budget", type=int, metavar="P", help="forward passes per run at every Q (default: the preset's)")
    g.add_argument("--keep-runs", action="store_true", default=None, help="keep run directories after recording")
