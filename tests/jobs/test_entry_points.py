"""`ray-s2p eval` and the job entry points jobs/eval.py, jobs/tune.py and jobs/bench.py, run as a user runs them.

The jobs connect with a bare ``ray.init()``; under ``ray job submit`` RAY_ADDRESS names the cluster.
Here RAY_ADDRESS names the test session's local Ray, so no job starts a Ray of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import smoke_dict
from ray_s2p.cli import main as cli
from ray_s2p.config import RunConfig
from ray_s2p.distributed.driver import train

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ray_s2p"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 30-step smoke run with evaluations at steps 0, 10, 20 and 30 and checkpoints at 10, 20, 30."""
    path = tmp_path_factory.mktemp("entry") / "run"
    train(RunConfig.from_dict(smoke_dict()), path, log=lambda m: None)
    return path


def recorded_eval(run: Path, step: int) -> dict:
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    return next(r for r in rows if r["kind"] == "eval" and r["step"] == step)


def job_env(ray_session) -> dict:
    address = ray_session.get_runtime_context().gcs_address
    return dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


def test_eval_command_reproduces_the_runs_own_evaluations(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    done = subprocess.run(CLI + ["eval", str(run_dir), "--step", "20", "--storage", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads((out / "eval-step-20.json").read_text())  # an earlier step: its own file
    assert not (out / "eval.json").exists()
    # The parameters replayed to step 20 are the ones replica 0 checkpointed at step 20 ...
    state = json.loads((run_dir / "checkpoints" / "step_00000020" / "state.json").read_text())
    assert printed["step"] == 20 and printed["digest"] == state["digest"]
    # ... and their held-out metrics are those the run itself recorded at step 20 (on two eval shards).
    recorded = recorded_eval(run_dir, 20)
    assert printed["eval_accuracy"] == recorded["eval_accuracy"]
    assert printed["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-6)
    # The same command in this process: the default step is the last, and errors exit 2 with the reason.
    assert cli(["eval", "--run", str(run_dir)]) == 0  # the earlier spelling still works
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert final["step"] == 30 and final["digest"] == summary["final_digest"]
    assert final["eval_accuracy"] == summary["final_metrics"]["eval_accuracy"]
    assert cli(["eval", "--run", str(run_dir), "--step", "99"]) == 2
    assert "--step 99 is outside the ledger (steps 0..30)" in capsys.readouterr().err
    assert cli(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_eval_job_writes_eval_json_to_storage(run_dir, tmp_path, ray_session):
    done = subprocess.run([sys.executable, "jobs/eval.py", str(run_dir), "--step", "10", "--storage",
                           str(tmp_path)], cwd=ROOT, env=job_env(ray_session), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "eval-step-10.json").read_text())
    recorded = recorded_eval(run_dir, 10)  # no checkpoint of step 10 is kept: the ledger replay reaches it
    assert out["step"] == 10 and (out["eval_accuracy"], out["eval_loss"]) == (
        recorded["eval_accuracy"], pytest.approx(recorded["eval_loss"], rel=1e-6))
    failing = subprocess.run([sys.executable, "jobs/eval.py", str(tmp_path / "nothing")], cwd=ROOT,
                             env=job_env(ray_session), capture_output=True, text=True, timeout=300)
    assert failing.returncode != 0 and "holds no run" in failing.stderr


def test_bench_job_replays_its_run_to_the_trained_digest(tmp_path, ray_session):
    results = tmp_path / "r.jsonl"
    done = subprocess.run([sys.executable, "jobs/bench.py", "replay", "--results", str(results), "--steps", "3",
                           "--repeats", "1", "--set", "task.name=synthetic", "--set", "task.eval_size=32"],
                          cwd=ROOT, env=job_env(ray_session), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["bench"] == "replay" and record["steps"] == 3 and record["digest_match"] is True
    bad = subprocess.run([sys.executable, "jobs/bench.py", "nope", "--results", str(results)], cwd=ROOT,
                         env=job_env(ray_session), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown benchmark" in bad.stderr


def test_tune_job_runs_a_sweep_with_the_equal_budget(tmp_path, ray_session):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(smoke_dict(**{"cluster.use_ray": True, "cluster.replicas": 1,
                                                "cluster.cpus_per_replica": 0.5, "eval_every": 20})))
    done = subprocess.run([sys.executable, "jobs/tune.py", "--config", str(cfg), "--storage", str(tmp_path / "tune"),
                           "--name", "job", "--optimizers", "vs2p", "--trials", "1", "--budget", "40", "--no-asha",
                           "--driver-cpus", "0.25"], cwd=ROOT, env=job_env(ray_session), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pq.read_table(tmp_path / "tune" / "job" / "comparison.parquet").to_pylist()
    assert [(r["optimizer"], r["forward_passes"], r["error"]) for r in table] == [("vs2p", 40, None)]
    assert "| vs2p |" in (tmp_path / "tune" / "job" / "comparison.md").read_text()


def test_jobs_take_address_like_ray_init(run_dir, tmp_path, ray_session):
    # --address joins the given cluster (here the tests' Ray) and is removed before `ray-s2p eval` parses
    # the rest, which knows no --address; without RAY_ADDRESS in the environment.
    env = {k: v for k, v in job_env(ray_session).items() if k != "RAY_ADDRESS"}
    address = ray_session.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "jobs/eval.py", f"--address={address}", str(run_dir),
                           "--storage", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Connecting to existing Ray cluster at address: {address}" in done.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 30

    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        from _common import pop_address
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    argv = ["jobs/train.py", "--config", "c.yaml", "--address", "auto", "--set", "steps=3"]
    assert pop_address(argv) == "auto" and argv == ["jobs/train.py", "--config", "c.yaml", "--set", "steps=3"]
    assert pop_address(argv) is None
    with pytest.raises(SystemExit, match="--address needs a value"):
        pop_address(["x", "--address"])
