"""The run records where its arithmetic happened; replay --check refuses where bits cannot match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ray_s2p.cli import main as cli
from ray_s2p.config import load_config
from ray_s2p.distributed.driver import train
from ray_s2p.zo.environment import agreed, numerics_environment, settle, to_metadata
from ray_s2p.zo.ledger import read_environment

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "smoke.yaml"


def _run(tmp_path: Path, steps: int = 6, checkpoint_every: int = 3) -> Path:
    cfg = load_config(SMOKE, ["cluster.use_ray=false", f"steps={steps}", f"checkpoint_every={checkpoint_every}",
                              "eval_every=3", "progress=false"])
    return train(cfg, tmp_path / "run", log=lambda m: None).run_dir


def _rewrite_environment(run_dir: Path, **changes: object) -> None:
    path = run_dir / "ledger.parquet"
    table = pq.read_table(path)
    env = {**read_environment(path), **changes}
    pq.write_table(table.replace_schema_metadata(to_metadata(env)), path)


def test_ledger_and_summary_record_the_environment(tmp_path):
    run = _run(tmp_path)
    env = read_environment(run / "ledger.parquet")
    assert env == json.loads((run / "summary.json").read_text())["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["distribution"] == "gaussian" and env["weights"] == "fp32"


def test_replay_check_refuses_another_torch_and_offers_the_tolerance(tmp_path, capsys):
    run = _run(tmp_path)
    assert cli(["replay", str(run), "--check"]) == 0  # same machine, same build: bit for bit
    _rewrite_environment(run, torch="2.0.0")
    capsys.readouterr()
    assert cli(["replay", str(run), "--check"]) == 2
    err = capsys.readouterr().err
    assert "bitwise equality cannot hold" in err and "torch: 2.0.0 -> " + torch.__version__ in err
    assert f"ray-s2p replay {run} --atol" in err
    assert cli(["replay", str(run), "--atol", "1e-6"]) == 0  # the tolerance comparison still answers
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reference"] == "checkpoints/step_00000006" and out["max_abs_diff"] == 0.0 and out["within"] is True
    assert out["tensors"] == 4  # the smoke MLP's two weights and two biases


def test_tolerance_comparison_against_final_and_its_failures(tmp_path, capsys):
    run = _run(tmp_path, steps=5, checkpoint_every=0)
    shutil.rmtree(run / "checkpoints")  # no checkpoint left: the final model is the reference
    assert cli(["replay", str(run), "--atol", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reference"] == "final/"
    assert cli(["replay", str(run), "--step", "2", "--atol", "0"]) == 2  # nothing of step 2 to compare with
    assert "no parameters of step 2" in capsys.readouterr().err
    assert cli(["replay", str(run), "--check", "--atol", "0"]) == 2
    assert "use one of them" in capsys.readouterr().err


def test_replicas_on_different_builds_are_refused_and_a_changed_resume_is_recorded():
    cpu = numerics_environment(torch.device("cpu"), "gaussian", "fp32")
    other = {**cpu, "cpu_capability": "NO AVX"}
    with pytest.raises(RuntimeError, match="replica 1 runs on cpu \\(NO AVX\\).*not be bitwise identical"):
        agreed([cpu, other])
    assert agreed([cpu, dict(cpu)]) == cpu
    assert settle(None, cpu, 0) == (cpu, None)
    assert settle(cpu, dict(cpu), 40) == (cpu, None)
    env, note = settle(cpu, other, 40)
    assert env["later"] == [{"from_step": 40, **other}] and env["cpu_capability"] == cpu["cpu_capability"]
    assert "resumed at step 40" in note and "replay --atol" in note


def test_gpus_asked_of_a_cluster_without_them_fail_before_any_replica(tmp_path, ray_session, capsys):
    run = tmp_path / "run"
    code = cli(["train", "--config", str(SMOKE), "--output", str(run), "--set", "cluster.gpus_per_replica=1",
                "--set", "steps=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cluster.replicas=2 x GPU=1.0 per replica needs 2 GPU, but the cluster has 0" in err
    assert "gpus_per_replica" in err and not run.exists()  # nothing was started or written


def test_the_noise_implementation_decides_bitwise_replay(tmp_path, capsys):
    run = _run(tmp_path)
    env = read_environment(run / "ledger.parquet")
    assert env["noise"] == "generator"
    # A ledger written before the key existed drew generator noise: it still replays bit for bit.
    path = run / "ledger.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(to_metadata({k: v for k, v in env.items() if k != "noise"})), path)
    assert cli(["replay", str(run), "--check"]) == 0
    _rewrite_environment(run, noise="philox/triton 3.9.0")
    capsys.readouterr()
    assert cli(["replay", str(run), "--check"]) == 2
    err = capsys.readouterr().err
    assert "noise: philox/triton 3.9.0 -> generator" in err and "noise implementations" in err


def test_replay_adopts_the_runs_thread_count_and_gives_the_callers_back(tmp_path):
    # On a CPU torch's GEMM gives other bits at another thread count (it splits the output among its threads),
    # so the run records its count and a replay computes with it. A ledger written before the count was
    # recorded replays at the caller's count, as before.
    from ray_s2p.distributed.replay import replay_run
    from ray_s2p.zo.environment import differences
    cfg = load_config(SMOKE, ["cluster.use_ray=false", "steps=4", "checkpoint_every=0", "eval_every=2",
                              "progress=false", "cluster.threads_per_replica=1"])
    before = torch.get_num_threads()
    try:
        result = train(cfg, tmp_path / "run", log=lambda m: None)
        assert read_environment(result.run_dir / "ledger.parquet")["threads"] == 1
        torch.set_num_threads(2)
        seen = []
        real = torch.set_num_threads
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "set_num_threads", lambda n: seen.append(n) or real(n))
            replayed = replay_run(result.run_dir, bitwise=True)
        assert replayed.digest == result.final_digest and seen[0] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    env = numerics_environment(torch.device("cpu"), "lowrank", "bf16")
    assert env["threads"] == torch.get_num_threads()
    old = {k: v for k, v in env.items() if k != "threads"}  # a ledger written before the count was recorded
    assert differences(old, env) == []
