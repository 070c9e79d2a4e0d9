"""The driver with in-process replicas: modes, equivalences, resume, replay, run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.digest import model_digest
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.replay import replay_run
from ray_s2p.tasks import build_task
from ray_s2p.zo.optimizer import ZerothOrderOptimizer


def run(tmp_path: Path, name: str, **overrides) -> tuple[RunConfig, object]:
    cfg = RunConfig.from_dict(smoke_dict(**overrides))
    return cfg, train(cfg, tmp_path / name, log=lambda m: None)


def test_direction_parallel_equals_single_process_with_n_directions(tmp_path):
    cfg, result = run(tmp_path, "dp", **{"cluster.replicas": 2, "optimizer.name": "mezo", "optimizer.lr": 0.2})
    # Single process: the same task, 2 directions per step, the same seeds and batches.
    task = build_task(cfg.task, cfg.seed)
    model = task.build_model().eval()
    names = task.trainable_names(model)
    single = cfg.optimizer.__class__(**{**cfg.optimizer.__dict__, "directions": 2})
    opt = ZerothOrderOptimizer(model, single, seed=cfg.seed, total_steps=cfg.steps, names=names)
    for k in range(1, cfg.steps + 1):
        batch = task.train_batch(k, 0, 1)
        opt.step(lambda: task.loss(model, batch))
    assert model_digest(model) == result.final_digest


def test_data_parallel_equals_one_replica_on_the_combined_batch(tmp_path):
    # Shard means averaged vs one mean over the union: equal up to float rounding, which the
    # 1/(2 rho) in gamma amplifies, so the comparison is short and at a float tolerance.
    common = {"optimizer.name": "mezo", "optimizer.lr": 0.05, "checkpoint_every": 0, "steps": 10}
    _, two = run(tmp_path, "two", **{"cluster.replicas": 2, "cluster.mode": "data", "task.batch_size": 16}, **common)
    _, one = run(tmp_path, "one", **{"cluster.replicas": 1, "cluster.mode": "data", "task.batch_size": 32}, **common)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank"])
@pytest.mark.parametrize("mode,replicas,groups", [("direction", 2, 1), ("data", 2, 1), ("hybrid", 4, 2)])
def test_modes_keep_replicas_identical_and_learn(tmp_path, mode, replicas, groups, distribution):
    # A rank-2 direction moves each matrix in a 2-dimensional subspace, so low-rank runs get 60 steps to the
    # Gaussian's 30 (at 30 their final/initial loss ranged 0.60-0.85 over seeds 3-7; at 60, 0.55-0.62).
    steps = 60 if distribution == "lowrank" else 30
    _, result = run(tmp_path, mode, **{"cluster.mode": mode, "cluster.replicas": replicas, "cluster.groups": groups,
                                       "cluster.digest_every": 1, "perturbation.distribution": distribution,
                                       "steps": steps})
    s = result.summary
    assert s["replica_resyncs"] == 0
    assert s["final_metrics"]["eval_loss"] < 0.8 * s["initial_metrics"]["eval_loss"]


def test_same_config_same_digest_and_replay(tmp_path):
    _, a = run(tmp_path, "a")
    _, b = run(tmp_path, "b")
    assert a.final_digest == b.final_digest
    replayed = replay_run(tmp_path / "a")
    assert replayed.digest == a.final_digest
    mid = replay_run(tmp_path / "a", step=10)
    ckpt = json.loads((tmp_path / "a" / "checkpoints" / "step_00000030" / "state.json").read_text())
    assert ckpt["digest"] == a.final_digest and mid.digest != a.final_digest


@pytest.mark.parametrize("interval", [1, 4])
def test_lowrank_runs_replay_bit_for_bit(tmp_path, interval):
    lowrank = {"perturbation.distribution": "lowrank", "perturbation.rank": 2,
               "perturbation.lowrank_interval": interval, "cluster.digest_every": 1}
    _, a = run(tmp_path, "a", **lowrank)
    _, gaussian = run(tmp_path, "g")
    assert a.final_digest != gaussian.final_digest  # the low-rank directions are other directions
    assert replay_run(tmp_path / "a").digest == a.final_digest
    assert a.summary["replica_resyncs"] == 0
    # The ledger stays seeds and scalars: the same columns and rows per step as a Gaussian run.
    la, lg = (pq.read_table(tmp_path / d / "ledger.parquet") for d in ("a", "g"))
    assert la.schema == lg.schema and la.num_rows == lg.num_rows


def test_run_directory_contents(tmp_path):
    cfg, result = run(tmp_path, "r")
    d = tmp_path / "r"
    for name in ("config.yaml", "ledger.parquet", "metrics.parquet", "summary.json", "checkpoints", "final"):
        assert (d / name).exists(), name
    assert RunConfig.from_dict(yaml.safe_load((d / "config.yaml").read_text())) == cfg
    ledger = pq.read_table(d / "ledger.parquet").to_pylist()
    assert len(ledger) == cfg.steps * 2  # one row per direction per step
    assert sorted({r["step"] for r in ledger}) == list(range(1, cfg.steps + 1))
    assert all(r["sigma"] is None or r["sigma"] >= 0 for r in ledger)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["steps_completed"] == cfg.steps and summary["final_digest"] == result.final_digest
    assert 0 < summary["bytes_sent_per_step"] + summary["bytes_received_per_step"] < 2048


def test_refuses_existing_run_without_resume_or_overwrite(tmp_path):
    run(tmp_path, "x")
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path, "x")
    cfg = RunConfig.from_dict(smoke_dict())
    again = train(cfg, tmp_path / "x", overwrite=True, log=lambda m: None)
    assert again.steps_completed == cfg.steps


def test_resume_continues_to_the_same_digest(tmp_path):
    cfg, full = run(tmp_path, "full")
    # A run stopped after step 20 (as if its driver died), then resumed to 30.
    short = RunConfig.from_dict(smoke_dict(steps=20))
    train(short, tmp_path / "part", log=lambda m: None)
    (tmp_path / "part" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda m: None)
    assert resumed.final_digest == full.final_digest
    steps = [r["step"] for r in pq.read_table(tmp_path / "part" / "ledger.parquet").to_pylist()]
    assert sorted(set(steps)) == list(range(1, 31)) and len(steps) == 60


def test_first_order_references_learn(tmp_path):
    for name, lr in (("sgd", 0.5), ("adamw", 0.02)):
        _, result = run(tmp_path, name, **{"optimizer.name": name, "optimizer.lr": lr, "cluster.replicas": 1})
        s = result.summary
        assert s["final_metrics"]["eval_loss"] < 0.7 * s["initial_metrics"]["eval_loss"], name


def test_noise_threads_leave_the_run_unchanged(tmp_path):
    # The same run with noise made on 1 and on 2 threads: the same bits.
    cfg, one = run(tmp_path, "one", **{"cluster.noise_threads": 1, "perturbation.mechanism": "swap"})
    _, two = run(tmp_path, "two", **{"cluster.noise_threads": 2, "perturbation.mechanism": "swap"})
    assert one.final_digest == two.final_digest


def test_first_order_resume_keeps_the_optimizer_moments(tmp_path):
    # AdamW's moments are saved with the parameters: a run stopped at step 20 and resumed to 30 ends
    # with the uninterrupted run's bits (restarting the moments would change every later step).
    fo = {"optimizer.name": "adamw", "optimizer.lr": 0.02, "cluster.replicas": 1}
    cfg, full = run(tmp_path, "full", **fo)
    train(RunConfig.from_dict(smoke_dict(steps=20, **fo)), tmp_path / "part", log=lambda m: None)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "part" / "checkpoints" / "step_00000020" / "params.safetensors"))
    moments = [k for k in saved if k.startswith("optimizer_state/") and k.endswith("/exp_avg_sq")]
    assert moments and float(saved[moments[0]].abs().sum()) > 0
    assert float(saved[moments[0].replace("exp_avg_sq", "step")]) == 20.0
    (tmp_path / "part" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda m: None)
    assert resumed.final_digest == full.final_digest


def test_first_order_needs_one_replica(tmp_path):
    with pytest.raises(ValueError, match="cluster.replicas=1"):
        run(tmp_path, "fo", **{"optimizer.name": "sgd"})


def test_cli_train_replay_check(tmp_path):
    cfg_file = tmp_path / "smoke.yaml"
    cfg_file.write_text(yaml.safe_dump(smoke_dict()))
    out = tmp_path / "cli"
    env_cmd = [sys.executable, "-m", "ray_s2p"]
    done = subprocess.run(env_cmd + ["train", "--config", str(cfg_file), "--output", str(out),
                                     "--set", "steps=12"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "before -> after" in done.stdout and "final digest" in done.stdout
    check = subprocess.run(env_cmd + ["replay", str(out), "--check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["match"] is True
    bad = subprocess.run(env_cmd + ["replay", str(out), "--step", "5", "--check"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1
    wrong = subprocess.run(env_cmd + ["train", "--config", str(cfg_file), "--output", str(tmp_path / "w"),
                                      "--set", "optimizer.lr=-1"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "optimizer.lr" in wrong.stderr


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional dependency")
    run(tmp_path, "tb", tensorboard=True)
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_lowrank_keys_change_the_fingerprint_only_of_lowrank_runs():
    from ray_s2p.distributed.checkpoint import config_fingerprint

    gaussian = RunConfig.from_dict(smoke_dict()).to_dict()
    before_lowrank = {**gaussian, "perturbation": {k: v for k, v in gaussian["perturbation"].items()
                                                   if k not in ("rank", "lowrank_interval")}}
    assert config_fingerprint(gaussian) == config_fingerprint(before_lowrank)  # older runs still resume
    lowrank = [RunConfig.from_dict(smoke_dict(**{"perturbation.distribution": "lowrank", "perturbation.rank": r}))
               for r in (1, 2)]
    assert config_fingerprint(lowrank[0].to_dict()) != config_fingerprint(lowrank[1].to_dict())


def test_random_search_with_one_direction_trains_the_weights_of_s2p_option_1_at_twice_the_lr(tmp_path):
    # The rule-level identity (tests/zo/test_step_rules.py) holds through the whole trainer: the same final
    # weights, bit for bit, which is why compare lists the rule once (docs/benchmarks.md, (a)).
    one = {"cluster.replicas": 1, "optimizer.directions": 1, "checkpoint_every": 0}
    _, rs = run(tmp_path, "rs", **one, **{"optimizer.name": "random_search", "optimizer.lr": 0.025})
    _, s2p = run(tmp_path, "s2p", **one, **{"optimizer.name": "s2p", "optimizer.step_size_option": 1,
                                            "optimizer.sign_trick": True, "optimizer.lr": 0.05})
    _, half = run(tmp_path, "half", **one, **{"optimizer.name": "s2p", "optimizer.step_size_option": 1,
                                             "optimizer.sign_trick": True, "optimizer.lr": 0.025})
    assert rs.final_digest == s2p.final_digest != half.final_digest
    assert rs.summary["final_metrics"]["eval_loss"] < rs.summary["initial_metrics"]["eval_loss"]
