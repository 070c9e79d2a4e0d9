"""The ``ray-s2p`` command line: one module per command group.

- cli/train.py: ``train`` (fresh or ``--resume``), ``replay``, ``eval``;
- cli/sweeps.py: ``tune``, ``compare``;
- cli/bench.py: ``bench``;
- cli/plot.py: ``plot``.

Each group imports its heavy modules (Ray, torch, transformers) only when its command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..config import ConfigError
from . import bench, plot, sweeps, train


def _offline_defaults() -> None:
    # Runs use local assets unless the user says otherwise; Ray usage stats stay off.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    """The ``ray-s2p`` parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="ray-s2p", description="Zeroth-order (S2P/VS2P) training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, sweeps, plot, bench):
        group.register(sub)
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
