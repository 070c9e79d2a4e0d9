"""Eval job: ray job submit --working-dir . -- python jobs/eval.py RUN_DIR [--step N] [--storage DIR]

Evaluates a run's parameters (replayed from its ledger to --step, default the last) on the held-out set
and writes eval.json (with --step N: eval-step-N.json) to --storage (default: the run directory)."""

import sys

from _common import run_job


def main() -> int:
    from ray_s2p.cli import main as cli

    return cli(["eval"] + sys.argv[1:])


if __name__ == "__main__":
    run_job(main)
