"""Bench job: ray job submit --working-dir . -- python jobs/bench.py [step scaling ...] [--results FILE.jsonl]
[--set key=value ...] [--steps N] [--repeats N]  (all flags of `ray-s2p bench`)."""

import sys

from _common import run_job


def main() -> int:
    from ray_s2p.cli import main as cli

    return cli(["bench"] + sys.argv[1:])


if __name__ == "__main__":
    run_job(main)
