"""The driver process killed (SIGKILL) twice and resumed: the run ends with the uninterrupted digest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.checkpoint import list_checkpoints
from ray_s2p.distributed.driver import train


def config_file(tmp_path: Path) -> tuple[Path, dict]:
    # kind=slow with at_step=15 sleeps 15 ms per step: time to kill the driver between checkpoints.
    data = smoke_dict(**{"steps": 240, "checkpoint_every": 40, "eval_every": 80, "log_every": 20,
                         "task.name": "fault_tasks:build",
                         "task.options": {"marker_dir": str(tmp_path), "at_step": 15, "replica": 1, "kind": "slow"}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def kill_after_checkpoint(cmd: list[str], run_dir: Path, min_step: int) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            steps = [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir / "checkpoints")]
            if steps and max(steps) >= min_step:
                break
            assert proc.poll() is None, "the driver finished before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_driver_killed_twice_and_resumed(tmp_path):
    cfg_path, data = config_file(tmp_path)
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "ray_s2p", "train"]
    kill_after_checkpoint(cli + ["--config", str(cfg_path), "--output", str(run_dir)], run_dir, 80)
    kill_after_checkpoint(cli + ["--resume", str(run_dir)], run_dir, 160)
    done = subprocess.run(cli + ["--resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = train(RunConfig.from_dict(data), tmp_path / "reference", log=lambda m: None)
    assert summary["final_digest"] == reference.final_digest
    rows = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    keys = [(r["step"], r["direction"]) for r in rows]
    assert len(keys) == len(set(keys)) == 240 * 2
    replay = subprocess.run([sys.executable, "-m", "ray_s2p", "replay", str(run_dir), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
