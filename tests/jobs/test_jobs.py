"""The Ray ecosystem paths: `ray job submit` to a local head, a Tune sweep with 2 trials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` on loopback with auth disabled; stopped by signalling that process only."""
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rs2p-", dir="/tmp"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # Every port explicit: another Ray on this machine (the test session's own) already holds the
    # default agent ports, and a head whose dashboard agent cannot bind never accepts jobs.
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = (free_port() for _ in range(7))
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--object-store-memory=150000000", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=1):
                break
        except OSError:
            assert head.poll() is None, "ray start exited early"
            time.sleep(0.5)
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: ray start stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(ray_bin: str, address: str, env: dict, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (it comes up after the
    dashboard port opens, later on a loaded machine)."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                               *entrypoint], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


def test_job_submit_to_local_head(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "results"
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    done = submit(ray_bin, address, env, ["python", "jobs/train.py", "--config", "jobs/configs/smoke.yaml",
                                          "--storage", str(storage), "--set", "steps=20"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((storage / "smoke" / "summary.json").read_text())
    assert summary["steps_completed"] == 20 and summary["replicas"] == 2
    failing = submit(ray_bin, address, env, ["python", "jobs/train.py", "--config", "jobs/configs/smoke.yaml",
                                             "--storage", str(storage), "--set", "optimizer.rho=0"])
    assert failing.returncode != 0
    assert "optimizer.rho" in failing.stdout + failing.stderr


def test_tune_sweep_two_trials_and_comparison_table(tmp_path, ray_session):
    from ray_s2p.config import load_config
    from ray_s2p.sweeps.tune import run_sweep

    cfg = load_config(ROOT / "jobs" / "configs" / "smoke.yaml",
                      ["cluster.replicas=1", "cluster.cpus_per_replica=0.5", "eval_every=20"])
    result = run_sweep(cfg, tmp_path / "tune", name="cmp", optimizers=["vs2p", "mezo"], trials_per_optimizer=1,
                       budget=80, driver_cpus=0.25, asha=False)
    assert [r["error"] for r in result.rows] == [None, None]
    assert sorted(r["optimizer"] for r in result.rows) == ["mezo", "vs2p"]
    assert all(r["forward_passes"] == 80 for r in result.rows)  # equal budget
    pq_path, md_path = result.write_tables(tmp_path / "tables")
    assert pq.read_table(pq_path).num_rows == 2
    text = md_path.read_text()
    assert "| vs2p |" in text and "| mezo |" in text
    # Trials reported Tune checkpoints that hold a resumable run.
    ckpts = list((tmp_path / "tune" / "cmp").glob("*/checkpoint_*/checkpoints/step_*/params.safetensors"))
    assert ckpts


def test_the_360m_shape_is_smollm2_360m() -> None:
    """jobs/smollm2_360m_shape.py's architecture has SmolLM2-360M's 361.8 M parameters, tied (built on the meta device)."""
    import importlib.util

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("smollm2_360m_shape", ROOT / "jobs" / "smollm2_360m_shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**module.SMOLLM2_360M))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 361_821_120
