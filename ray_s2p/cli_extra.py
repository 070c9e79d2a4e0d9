"""Sub-commands beyond train/replay: registered here to keep cli.py short."""

from __future__ import annotations

import argparse


def add_commands(sub: "argparse._SubParsersAction") -> None:
    """Register the optional sub-commands (each imports its heavy modules lazily)."""
    from .plot import add_plot_command

    add_plot_command(sub)
