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
import pytest
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


@pytest.mark.parametrize("mode", ["direction", "data"])
def test_torn_metrics_are_rebuilt_from_the_ledger_and_every_fallback_says_so(tmp_path, mode):
    """A resume finds metrics.parquet torn and the newest checkpoint corrupted: both fallbacks log one line, the
    train rows and forward-pass total come back from the ledger, the wall time from the older checkpoint."""
    cfg = RunConfig.from_dict(smoke_dict(**{"cluster.mode": mode}))  # 30 steps, checkpoints at 10, 20, 30
    run_dir = tmp_path / "run"
    first = train(cfg, run_dir, log=lambda m: None)
    reference = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    blob = bytearray((newest / "params.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (newest / "params.safetensors").write_bytes(bytes(blob))
    data = (run_dir / "metrics.parquet").read_bytes()
    (run_dir / "metrics.parquet").write_bytes(data[: len(data) // 2])

    messages: list[str] = []
    resumed = train(cfg, run_dir, resume=True, log=messages.append)
    fallbacks = [m for m in messages if m.startswith("checkpoint fallback")]
    assert len(fallbacks) == 1 and "step_00000030" in fallbacks[0] and "using step_00000020" in fallbacks[0]
    rebuilt = [m for m in messages if m.startswith("metrics.parquet is unreadable")]
    assert len(rebuilt) == 1 and "steps 1-20" in rebuilt[0], messages
    assert resumed.final_digest == first.final_digest
    # 2 directions x 1 shard (direction mode) or 1 direction x 2 shards (data mode), 2 losses each, 30 steps
    assert resumed.summary["forward_passes"] == first.summary["forward_passes"] == 30 * 4
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    ours = {r["step"]: r for r in rows if r["kind"] == "train"}
    theirs = {r["step"]: r for r in reference if r["kind"] == "train"}
    assert sorted(ours) == list(range(1, 31))
    for step in range(1, 31):
        assert ours[step]["loss"] == theirs[step]["loss"]
        assert ours[step]["forward_passes"] == theirs[step]["forward_passes"]
    assert rows[0]["kind"] == "eval" and rows[0]["step"] == 0 and rows[0]["eval_loss"] == reference[0]["eval_loss"]
    assert resumed.summary["initial_metrics"] == first.summary["initial_metrics"]
    kept = json.loads((run_dir / "checkpoints" / "step_00000020" / "state.json").read_text())["wall_seconds"]
    assert 0 < kept < resumed.summary["wall_seconds"]
