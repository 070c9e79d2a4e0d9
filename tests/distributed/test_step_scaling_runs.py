"""Step scaling in the trainer: the ledger records what was applied, replay stays exact, and a resume with
another replica count continues with the step scaled for the new Q."""

from __future__ import annotations

import math

import pyarrow.parquet as pq

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.replay import replay_run

QUIET = {"log": lambda m: None}


def ledger(run_dir):
    return pq.read_table(run_dir / "ledger.parquet").to_pylist()


def test_a_config_at_its_tuned_q_trains_the_digest_of_the_plain_average(tmp_path):
    # What the shipped configs rely on: at Q = tuned_directions the run is the one of the plain q-average.
    common = {"steps": 12, "checkpoint_every": 0, "eval_every": 0, "cluster.replicas": 2}
    tuned = train(RunConfig.from_dict(smoke_dict(**common, **{"optimizer.tuned_directions": 2})), tmp_path / "a", **QUIET)
    plain = train(RunConfig.from_dict(smoke_dict(**common, **{"optimizer.step_scaling": "none"})), tmp_path / "b", **QUIET)
    scaled = train(RunConfig.from_dict(smoke_dict(**common)), tmp_path / "c", **QUIET)  # tuned 1: factor 2
    assert tuned.final_digest == plain.final_digest
    assert scaled.final_digest != plain.final_digest


def test_resume_with_more_replicas_scales_the_step_for_the_new_q_and_replays_exactly(tmp_path):
    # VS2P, linear scaling tuned at Q = 1: with 1 replica c = -a sign(gamma); after a resume on 3 replicas
    # (Q = 3) the average over 3 directions is scaled by 3, so every direction still moves its whole a.
    # With step_scaling none it would move a / 3: the test tells the two apart.
    first = RunConfig.from_dict(smoke_dict(**{"steps": 10, "checkpoint_every": 5, "cluster.replicas": 1}))
    run_dir = tmp_path / "run"
    train(first, run_dir, **QUIET)
    more = first.replace({"steps": 16, "cluster.replicas": 3})
    resumed = train(more, run_dir, resume=True, **QUIET)
    rows = ledger(run_dir)
    per_step: dict[int, list[dict]] = {}
    for row in rows:
        per_step.setdefault(row["step"], []).append(row)
    assert [len(per_step[k]) for k in range(1, 17)] == [1] * 10 + [3] * 6
    moved = 0
    for step, group in per_step.items():
        for row in group:
            if row["skipped"] or row["gamma"] == 0:
                continue
            expected = -row["step_size"] * math.copysign(1.0, row["gamma"])
            # the factor Q / 1 times the 1/Q average: exact for Q = 1, within one rounding for Q = 3
            assert math.isclose(row["coefficient"], expected, rel_tol=1e-15), (step, row)
            moved += 1
    assert moved >= 25
    check = replay_run(run_dir, bitwise=True)
    assert check.digest == resumed.final_digest


def test_sqrt_scaling_in_a_run_is_what_the_ledger_says(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict(**{"steps": 6, "checkpoint_every": 0, "cluster.replicas": 4,
                                            "optimizer.name": "mezo", "optimizer.step_scaling": "sqrt"}))
    result = train(cfg, tmp_path / "run", **QUIET)
    for row in ledger(tmp_path / "run"):
        # MeZO: c = -lr gamma * sqrt(4) / 4 = -lr gamma / 2 (lr 0.05 from the smoke config)
        assert math.isclose(row["coefficient"], -0.05 * row["gamma"] / 2, rel_tol=1e-12)
    assert replay_run(tmp_path / "run", bitwise=True).digest == result.final_digest


def test_first_order_references_ignore_the_step_scaling(tmp_path):
    # SGD runs on one replica with its own lr: the zeroth-order scaling keys change nothing there.
    common = {"steps": 5, "checkpoint_every": 0, "eval_every": 0, "cluster.replicas": 1, "optimizer.name": "sgd",
              "optimizer.directions": 4}
    a = train(RunConfig.from_dict(smoke_dict(**common, **{"optimizer.tuned_directions": 1})), tmp_path / "a", **QUIET)
    b = train(RunConfig.from_dict(smoke_dict(**common, **{"optimizer.step_scaling": "none"})), tmp_path / "b", **QUIET)
    assert a.final_digest == b.final_digest
