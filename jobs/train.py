"""Train job: ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/smoke.yaml --storage DIR

Writes the run directory to STORAGE/NAME (NAME defaults to the config's file name); STORAGE is a path every
node sees (NFS) or a URI such as s3://bucket/runs.
Extra arguments (--set key=value, --resume, --overwrite) are passed to `ray-s2p train`.
"""

import argparse
from pathlib import Path

from _common import run_job


def main() -> int:
    from ray_s2p.cli import main as cli
    from ray_s2p.storage_fs import location

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--storage", required=True, help="directory or URI that receives the run directory")
    parser.add_argument("--name", help="run directory name (default: the config file's stem)")
    args, rest = parser.parse_known_args()
    run_dir = location(args.storage) / (args.name or Path(args.config).stem)  # a URI keeps its ?query last
    if "--resume" in rest:
        return cli(["train", "--resume", str(run_dir)] + [a for a in rest if a != "--resume"])
    return cli(["train", "--config", args.config, "--output", str(run_dir)] + rest)


if __name__ == "__main__":
    run_job(main)
