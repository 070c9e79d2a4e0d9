"""The wall-clock side of the speed-up benchmark: the step-time model, the projection, the time to a target."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import smoke_dict
from ray_s2p.bench.speedup_wall import engine_costs, projection, step_model, time_to_target, wall_to_target
from ray_s2p.config import RunConfig


def test_the_step_model_charges_the_driver_what_one_replica_leaves():
    # T(1) = 0.050 measured; T_p = 0.030, u(1) = 0.005 -> t_d = 0.015; T(2) = 0.030 + 0.006 + 0.015 = 0.051.
    costs = {"probe_seconds": 0.030, "update_seconds_at": {1: 0.005, 2: 0.006, 64: 0.070}}
    model = step_model(costs, {1: 0.050, 2: 0.0612})
    assert model["driver_seconds"] == pytest.approx(0.015)
    assert model["seconds_per_step"][2] == pytest.approx(0.051)
    assert model["seconds_per_step"][64] == pytest.approx(0.115)
    assert model["model_check"]["ratio"] == pytest.approx(1.2)


def test_projection_splits_the_speedup_into_steps_and_time():
    # S(1) = 1000, S(4) = 300 -> E(4) = 1000 / 1200 = 5/6; T(1) = 0.05, T(4) = 0.06 -> ratio 5/6;
    # speed-up = 4 * 5/6 * 5/6 = 2.777...; S(64) = 20 -> E = 1000/1280 = 0.78125, T ratio 0.05/0.2 = 0.25.
    out = projection({1: 1000.0, 4: 300.0, 64: 20.0}, {1: 0.05, 4: 0.06, 64: 0.2, 8: 0.07})
    assert sorted(out) == [1, 4, 64]
    assert out[1]["speedup"] == pytest.approx(1.0)
    assert out[4]["speedup"] == pytest.approx(4 * (5 / 6) ** 2)
    assert out[64]["step_efficiency"] == pytest.approx(0.78125)
    assert out[64]["speedup"] == pytest.approx(64 * 0.78125 * 0.25)
    assert out[64]["limited_by"] == "time per step"
    assert projection({2: 10.0}, {1: 0.1, 2: 0.1}) == {}  # no S(1): nothing to project


def test_wall_to_target_interpolates_between_evaluations(tmp_path: Path):
    rows = [{"kind": "eval", "step": 0, "wall_seconds": 0.0, "eval_accuracy": 0.5},
            {"kind": "train", "step": 5, "wall_seconds": 4.0, "eval_accuracy": None},
            {"kind": "eval", "step": 10, "wall_seconds": 10.0, "eval_accuracy": 0.6},
            {"kind": "eval", "step": 20, "wall_seconds": 20.0, "eval_accuracy": 0.8}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "metrics.parquet")
    assert wall_to_target(tmp_path, 0.7) == pytest.approx(15.0)  # halfway between 0.6 at 10 s and 0.8 at 20 s
    assert wall_to_target(tmp_path, 0.9) is None


def test_engine_costs_time_every_update_size():
    cfg = RunConfig.from_dict(smoke_dict())
    costs = engine_costs(cfg, repeats=1, at=(1, 4))
    assert set(costs["update_seconds_at"]) == {1, 4}
    assert costs["probe_seconds"] > 0 and all(u > 0 for u in costs["update_seconds_at"].values())
    assert costs["trainable_parameters"] > 0


def test_time_to_target_runs_one_and_two_ray_replicas(ray_session):
    cfg = RunConfig.from_dict(smoke_dict(**{"task.eval_size": 64}))
    out = time_to_target(cfg, target=1.01, steps_one=8, repeats=1, log=lambda m: None)  # accuracy never > 1
    assert out["seconds_one"] == [None] and out["seconds_two"] == [None]
    assert out["speedups"] == [] and out["speedup_median"] is None
