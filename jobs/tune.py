"""Tune job: ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/smoke.yaml --storage DIR
[--optimizers vs2p,mezo --trials 4 --budget 2000 ...]  (all flags of `ray-s2p tune`)."""

import sys

from _common import run_job


def main() -> int:
    from ray_s2p.cli import main as cli

    return cli(["tune"] + sys.argv[1:])


if __name__ == "__main__":
    run_job(main)
