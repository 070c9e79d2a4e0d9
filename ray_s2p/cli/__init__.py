"""The ``ray-s2p`` command line: one module per command group.

- cli/train.py: ``train`` (fresh or ``--resume``), ``replay``, ``eval``;
- cli/sweeps.py: ``tune``, ``compare``;
- cli/bench.py: ``bench``;
- cli/plot.py: ``plot``.

Each group imports its heavy modules (Ray, torch, transformers) only when its command runs.

Errors: a ``RayS2PError`` (ray_s2p/errors.py: bad input, a missing or damaged file, a
run that cannot go on) or a missing file prints one line and exits 2; anything else
is a bug and keeps its traceback. ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import RayS2PError
from . import bench, plot, sweeps, train


def _quiet_defaults() -> None:
    # Ray usage stats stay off, and tokenizers' own threads do not fight the replicas', unless the user
    # set either.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    """The ``ray-s2p`` parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="ray-s2p", description="Zeroth-order (S2P/VS2P) training on Ray")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error, not only of unexpected ones")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, sweeps, plot, bench):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ray-s2p`` and ``python -m ray_s2p``."""
    _quiet_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RayS2PError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"ray-s2p {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
