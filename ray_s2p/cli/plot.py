"""``ray-s2p plot``: learning curves of run directories into one PNG (drawing in plots/curves.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..plots.curves import SMOOTHING_WINDOW


def _plot(args: argparse.Namespace) -> int:
    from ..plots.curves import plot_runs

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    path = plot_runs(args.run_dirs, Path(args.output), labels=labels, window=args.smooth)
    print(path)
    return 0


def register(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``ray-s2p plot RUN_DIR [RUN_DIR ...] -o FILE.png [--labels a,b] [--smooth N]``.

    Args:
        sub: the object returned by ``ArgumentParser.add_subparsers()``.

    Returns:
        The new sub-parser; its ``func`` default takes the parsed Namespace and returns 0.
    """
    p = sub.add_parser("plot", help="plot learning curves of one or more runs into a PNG",
                       description="Train loss and eval metric vs step and vs forward passes, several runs per figure.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (path or URI) holding metrics.parquet")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="PNG to write (replaced atomically)")
    p.add_argument("--labels", help="comma-separated legend labels, one per RUN_DIR "
                                    "(default: '<optimizer.name> (<dir name>)')")
    p.add_argument("--smooth", type=int, default=SMOOTHING_WINDOW, metavar="N",
                   help=f"moving-average window of the train loss, in logged points (default {SMOOTHING_WINDOW})")
    p.set_defaults(func=_plot)
    return p
