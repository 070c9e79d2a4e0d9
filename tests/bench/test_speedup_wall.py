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
    out = time_to_target(cfg, target=1.01, steps_one=8, repeats=2, log=lambda m: None)  # accuracy never > 1
    assert out["seeds"] == [cfg.seed, cfg.seed + 1]  # each repeat a new trajectory
    assert out["seconds_one"] == [None, None] and out["seconds_two"] == [None, None]
    assert out["speedups"] == [] and out["speedup_median"] is None


def test_mode_times_pick_the_mode_that_reaches_the_target_first():
    # T_p = 0.04, u(1) = 0.01, u(2) = 0.012, t_d = 0.01; T_p(B/2) = 0.025.
    # direction: S(2) 600 x (0.04 + 0.012 + 0.01) = 37.2; weak: 800 x 0.06 = 48; strong: 1000 x 0.045 = 45.
    from ray_s2p.bench.speedup_wall import mode_times
    costs = {"probe_seconds": 0.04, "update_seconds_at": {1: 0.01, 2: 0.012}, "probe_seconds_shard": {2: 0.025}}
    model = {"driver_seconds": 0.01, "seconds_per_step": {1: 0.06, 2: 0.062}}
    rows = mode_times({1: 1000.0, 2: 600.0}, {2: 800.0}, costs, model)
    assert rows[2]["direction"] == pytest.approx(37.2)
    assert rows[2]["data_weak"] == pytest.approx(48.0)
    assert rows[2]["data_strong"] == pytest.approx(45.0)
    assert rows[2]["first"] == "direction"


def test_data_and_wall_phases_on_the_tiny_preset_and_their_report(tmp_path, ray_session, monkeypatch):
    # The data phase trains Q = 1 on a 2-fold batch (2 data-mode replicas, weak batch scaling); the wall
    # phase times Ray replicas and records one entry; --report-only renders both from the progress file.
    import dataclasses

    from ray_s2p.bench import speedup
    from ray_s2p.bench.speedup import SEEDS, Speedup, SpeedupOptions
    from ray_s2p.bench.speedup_report import write_report
    from ray_s2p.bench.speedup_runs import SpeedupProgress, run_key
    # A target every seed of the short tiny runs reaches (they end between 0.55 and 0.95), short Ray runs.
    monkeypatch.setitem(speedup.PRESETS, "tiny", dataclasses.replace(speedup.PRESETS["tiny"], target=0.5))
    monkeypatch.setattr(speedup, "WALL_RAY_STEPS", 4)
    monkeypatch.setattr(speedup, "WALL_TIME_REPEATS", 1)

    progress = tmp_path / "p.json"
    opts = dict(tasks=("tiny",), q=(1, 2), progress=str(progress), output=str(tmp_path / "runs"), budget=80,
                resume=True)
    logs: list[str] = []
    for phase in ("default", "data", "wall"):
        Speedup(SpeedupOptions(phase=phase, **opts), {}, logs.append).run_part()
    runs = SpeedupProgress.load(progress).runs
    for seed in SEEDS:
        entry = runs[run_key("tiny", 1, 1.0, seed, "test", 2)]
        assert entry["shards"] == 2 and entry["steps"] == 40  # the steps of Q = 1, on a 2-fold batch
    wall = runs["tiny/wall"]
    assert set(wall["ray_seconds_per_step"]) == {"1", "2"} and wall["model"]["driver_seconds"] >= 0
    assert "1" in wall["projection"] and wall["projection"]["1"]["speedup"] == pytest.approx(1.0)
    assert set(wall["s_of_q"]) == {"1", "2"}
    assert len(wall["time_to_target"]["seconds_one"]) == 1 and len(wall["time_to_target"]["seconds_two"]) == 1
    job = Speedup(SpeedupOptions(phase="all", **opts), {}, logs.append)
    summaries = job.summaries()
    assert summaries["tiny"]["data"][2]["runs"] == 3 and summaries["tiny"]["wall"] is not None
    paths = write_report(summaries, tmp_path / "speedup.md", (0.25, 0.5, 1.0, 2.0, 4.0))
    text = paths[0].read_text()
    assert "### tiny: wall clock" in text and "Model T(N) = T_p + u(N) + t_d" in text
    assert "Target: projected speed-up >= 6x at N = 8: n/a (S not measured)" in text
    assert "| N | direction | data, weak batch scaling | data, strong batch scaling | first |" in text
    assert paths[2].name == "speedup_replicas.png" and paths[2].stat().st_size > 1000


def test_two_processes_recording_into_one_progress_file_keep_each_others_runs(tmp_path):
    # Each part holds the file as it was when it started; a run the other part recorded again since
    # must not be written back in its old version.
    from ray_s2p.bench.speedup_runs import SpeedupProgress
    path = tmp_path / "p.json"
    SpeedupProgress.load(path).record("a", {"fingerprint": "old"})
    first, second = SpeedupProgress.load(path), SpeedupProgress.load(path)  # both hold "a" = old
    first.record("a", {"fingerprint": "new"})   # recorded again (e.g. after a config change)
    second.record("b", {"fingerprint": "b"})
    runs = SpeedupProgress.load(path).runs
    assert runs == {"a": {"fingerprint": "new"}, "b": {"fingerprint": "b"}}
