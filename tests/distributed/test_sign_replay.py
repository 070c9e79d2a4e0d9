"""ZO-signSGD in the trainer: identical replicas, exact replay and resume, and a ledger that says what was applied."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.replay import replay_run
from ray_s2p.zo.ledger import read_table, rows_digest, table_rows, updates_by_step

SIGNSGD = {"optimizer.name": "zo_signsgd", "optimizer.lr": 0.01, "optimizer.weight_decay": 0.5,
           "cluster.digest_every": 1}


def run(tmp_path, name, **overrides):
    cfg = RunConfig.from_dict(smoke_dict(**{**SIGNSGD, **overrides}))
    return cfg, train(cfg, tmp_path / name, log=lambda m: None)


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_signsgd_run_keeps_replicas_identical_learns_and_replays_bit_for_bit(tmp_path, weights):
    cfg, result = run(tmp_path, "s", **{"precision.weights": weights})
    s = result.summary
    assert s["replica_resyncs"] == 0  # digests compared after every step: both replicas formed the same signs
    assert s["final_metrics"]["eval_loss"] < 0.8 * s["initial_metrics"]["eval_loss"]
    assert replay_run(tmp_path / "s").digest == result.final_digest
    ledger = pq.read_table(tmp_path / "s" / "ledger.parquet").to_pylist()
    assert len(ledger) == cfg.steps * 2
    # What replay needs to redo the sign update: lr 0.01 scaled by s(Q) = 2 (2 replicas, linear step scaling).
    assert {r["sign_step"] for r in ledger} == {0.02}
    assert {r["param_scale"] for r in ledger} == {1 - 0.02 * 0.5}
    mezo_dir = tmp_path / "m"
    train(RunConfig.from_dict(smoke_dict(**{"optimizer.name": "mezo"})), mezo_dir, log=lambda m: None)
    assert {r["sign_step"] for r in pq.read_table(mezo_dir / "ledger.parquet").to_pylist()} == {None}


def test_signsgd_resume_continues_to_the_uninterrupted_digest(tmp_path):
    cfg, full = run(tmp_path, "full")
    short = RunConfig.from_dict(smoke_dict(**{**SIGNSGD, "steps": 20}))
    train(short, tmp_path / "part", log=lambda m: None)
    (tmp_path / "part" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda m: None)
    assert resumed.final_digest == full.final_digest


def test_ledgers_written_before_sign_updates_still_read_and_replay(tmp_path):
    # A ledger without the sign_step column (as written before it existed) reads as linear updates with
    # the same digest, and its run replays to the same parameters.
    _, result = run(tmp_path, "old", **{"optimizer.name": "vs2p", "optimizer.weight_decay": 0.0})
    path = tmp_path / "old" / "ledger.parquet"
    table = pq.read_table(path)
    rows_now = table_rows(read_table(path))
    pq.write_table(table.drop(["sign_step"]), path)
    rows_then = table_rows(read_table(path))
    assert rows_then == rows_now and all(u[3] is None for u in updates_by_step(rows_then))
    assert rows_digest(rows_then) == rows_digest(rows_now)
    assert replay_run(tmp_path / "old").digest == result.final_digest
