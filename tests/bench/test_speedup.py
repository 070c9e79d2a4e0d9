"""`ray-s2p bench speedup`: the arithmetic by hand, and the tiny preset end to end (real runs, nothing timed)."""

from __future__ import annotations

import json

import pytest

import ray_s2p.distributed.driver as driver_module
from ray_s2p.bench.speedup import MULTIPLIERS, SEEDS, Speedup, SpeedupOptions
from ray_s2p.bench.speedup_fit import E4_MIN, efficiency, fit_speedup, pick_multiplier, steps_to_target, summarise_task
from ray_s2p.bench.speedup_runs import SpeedupProgress, run_key
from ray_s2p.cli import main as cli
from ray_s2p.errors import RayS2PError


# ------------------------------------------------------------------ the fit
def test_fit_recovers_s_inf_and_q_c_from_exact_values():
    s_inf, q_c = 120.0, 6.0
    fit = fit_speedup({q: s_inf * (1 + q_c / q) for q in (1, 2, 4, 8, 16, 32, 64)})
    assert fit.meaningful and fit.note == ""
    assert fit.a == pytest.approx(s_inf, rel=1e-12) and fit.q_c == pytest.approx(q_c, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0) and fit.points == (1, 2, 4, 8, 16, 32, 64)
    assert fit.as_dict()["s_inf"] == fit.a


def test_fit_weights_relative_errors_so_one_noisy_large_s_does_not_decide_it():
    # True S = 5 + 100 / Q, but Q = 1 measured 150 instead of 105. Plain least squares in 1/Q gives
    # S = -8.7 + 153.2 / Q (no saturation at all); weighted by 1 / S^2 the fit keeps a positive S_inf.
    fit = fit_speedup({1: 150.0, 2: 55.0, 4: 30.0, 8: 17.5})
    assert fit.meaningful and 0 < fit.a < 5 and 100 < fit.b < 150


@pytest.mark.parametrize("points, words", [
    ({1: 100.0, 2: 60.0}, "the fit needs 3"),                 # two Q only
    ({1: 100.0}, "the fit needs 3"),                          # one Q: no line at all
    ({1: 10.0, 2: 20.0, 4: 30.0}, "b = "),                    # more directions, more steps: b < 0
    ({1: 95.0, 2: 45.0, 4: 20.0}, "S_inf = -5"),              # 100 / Q - 5: falls faster than 1/Q
])
def test_fit_says_when_it_is_not_meaningful(points, words):
    fit = fit_speedup(points)
    assert not fit.meaningful and words in fit.note


# ------------------------------------------------------------------ steps to target, efficiency, pick
def test_steps_to_target_is_interpolated_between_the_evaluations_around_the_first_crossing():
    curve = [(0, 0.50), (10, 0.60), (20, 0.70), (30, 0.90), (40, 0.95)]
    # 0.8 lies halfway between 0.7 (step 20) and 0.9 (step 30): 20 + (0.8 - 0.7) / (0.9 - 0.7) * 10 = 25
    assert steps_to_target(curve, 0.8) == pytest.approx(25.0)
    assert steps_to_target(curve, 0.5) == 0.0                  # the first evaluation already reaches it
    # the first crossing counts, not a later one: 0 + (0.8 - 0.5) / (0.85 - 0.5) * 10 = 8.5714...
    assert steps_to_target([(0, 0.5), (10, 0.85), (20, 0.7), (30, 0.9)], 0.8) == pytest.approx(60 / 7)
    assert steps_to_target([(0, 0.5), (10, None), (20, 0.9)], 0.7) == pytest.approx(10.0)  # a missing eval skipped
    assert steps_to_target(curve, 0.96) is None                # never reached: censored


def test_efficiency_values():
    assert efficiency(100.0, 4, 25.0) == pytest.approx(1.0)   # the ideal 4-fold cut
    assert efficiency(100.0, 4, 50.0) == pytest.approx(0.5)
    s = {q: 50.0 * (1 + 8.0 / q) for q in (1, 4, 16)}        # under the law E(Q) = (1 + Q_c) / (Q + Q_c)
    assert efficiency(s[1], 4, s[4]) == pytest.approx(9 / 12) and efficiency(s[1], 16, s[16]) == pytest.approx(9 / 24)
    assert efficiency(None, 4, 25.0) is None and efficiency(100.0, 4, None) is None
    assert efficiency(100.0, 4, 0.0) is None


def test_pick_multiplier_fewest_steps_ties_to_the_middle_else_best_final_accuracy():
    assert pick_multiplier([(0.25, None, 0.6), (0.5, 90.0, 0.8), (1.0, 40.0, 0.8), (2.0, 30.0, 0.9),
                            (4.0, None, 0.5)]) == (2.0, "steps")
    assert pick_multiplier([(0.25, 30.0, 0.8), (1.0, 30.0, 0.8), (4.0, 30.0, 0.8)]) == (1.0, "steps")
    assert pick_multiplier([(0.5, None, 0.61), (1.0, None, 0.6), (2.0, None, 0.7)]) == (2.0, "final accuracy")
    assert pick_multiplier([(1.0, None, None)])[0] is None


# ------------------------------------------------------------------ the summary and its targets
def run(s: float | None, steps: int, target: float, final: float) -> dict:
    """A recorded run whose curve crosses ``target`` exactly at step ``s`` (None: never)."""
    top = target + 0.05 if s is not None else target - 0.05
    curve = [[0, 0, 0.0, 0.5]] + ([[s, 0, 0.0, target]] if s is not None else []) + [[steps, 0, 0.0, top]]
    return {"steps": steps, "curve": curve, "error": None, "final": {"accuracy": final, "wall_seconds": 1.0}}


def test_summary_e_ratio_censored_runs_and_targets():
    target, qs = 0.8, (1, 2, 4, 8, 16)
    law = {q: 100.0 * (1 + 8.0 / q) for q in qs}              # S_inf 100, Q_c 8
    table = {}
    for q in qs:
        for m in MULTIPLIERS:                                 # tuning: m = 1 strictly fastest
            table[(q, m, 0, "validation")] = run(law[q] * (1 if m == 1.0 else 2), 1000, target, 0.9)
        for seed in SEEDS:
            table[(q, 1.0, seed, "test")] = run(law[q], 1000, target, 0.9)
    summary = summarise_task(table, target, qs, SEEDS, MULTIPLIERS)
    rows = {r["q"]: r for r in summary["rows"]}
    assert rows[4]["pick"] == 1.0 and rows[4]["default"]["S"] == [pytest.approx(300.0)] * 3
    assert rows[4]["E"] == pytest.approx(900 / (4 * 300))     # 0.75 = (1 + 8) / (4 + 8)
    assert rows[16]["E"] == pytest.approx(9 / 24) and rows[8]["ratio"] == pytest.approx(1.0)
    assert summary["fit"]["meaningful"] and summary["fit"]["q_c"] == pytest.approx(8.0)
    t = summary["targets"]
    assert t["E4"]["status"] == "missed" and t["E4"]["min"] == E4_MIN and t["E16"]["status"] == "missed"
    assert t["default_vs_tuned"]["status"] == "met" and t["final_accuracy"]["status"] == "met"

    # Q = 4: one default seed never reaches the target; it stays in the counts (censored, not dropped).
    table[(4, 1.0, 2, "test")] = run(None, 500, target, 0.7)
    rows = {r["q"]: r for r in summarise_task(table, target, qs, SEEDS, MULTIPLIERS)["rows"]}
    d = rows[4]["default"]
    assert (d["runs"], d["reached"], d["complete"]) == (3, 2, False) and d["S"][2] is None
    assert rows[4]["E"] is None
    # upper bound on E: the censored run counted at its last step, mean S >= (300 + 300 + 500) / 3
    assert rows[4]["E_max"] == pytest.approx(900 / (4 * 1100 / 3))
    summary = summarise_task(table, target, qs, SEEDS, MULTIPLIERS)
    assert summary["targets"]["final_accuracy"]["below"] == [4]  # mean (0.9 + 0.9 + 0.7) / 3 < 0.9 - 0
    assert summary["targets"]["final_accuracy"]["status"] == "missed"
    assert summarise_task(table, None, qs, SEEDS, MULTIPLIERS)["rows"][0]["default"]["S_mean"] is None


# ------------------------------------------------------------------ end to end on the tiny preset
@pytest.fixture
def count_trains(monkeypatch):
    calls = []
    real = driver_module.train

    def counted(config, run_dir, **kwargs):
        calls.append((config.optimizer.directions, config.seed, config.task.eval_split, config.steps))
        return real(config, run_dir, **kwargs)

    monkeypatch.setattr(driver_module, "train", counted)
    return calls


def test_tiny_preset_end_to_end_resume_rerun_and_report(tmp_path, capsys, count_trains):
    progress, output, report = tmp_path / "p.json", tmp_path / "runs", tmp_path / "doc" / "speedup.md"
    base = ["bench", "speedup", "--tasks", "tiny", "--q", "1,2", "--budget", "80", "--progress", str(progress),
            "--output", str(output), "--results", str(tmp_path / "r.jsonl")]
    assert cli(base) == 0
    first = len(count_trains)
    stored = SpeedupProgress.load(progress).runs
    data = json.loads(progress.read_text())
    assert data["benchmark"] == "speedup" and data["runs"].keys() == stored.keys()
    expected = set()
    job = Speedup(SpeedupOptions(tasks=("tiny",), progress=str(progress), budget=80))
    for q in (1, 2):
        expected |= {run_key("tiny", q, m, 0, "validation") for m in MULTIPLIERS}
        expected |= {run_key("tiny", q, 1.0, s, "test") for s in SEEDS}
        pick = job.pick("tiny", q, job.table("tiny", [q])[0])
        assert pick in MULTIPLIERS
        expected |= {run_key("tiny", q, pick, s, "test") for s in SEEDS}
    assert set(stored) == expected and first == len(expected)  # every run once: a shared m = 1 run is not retrained
    for key, entry in stored.items():
        steps = 40 if "/q1/" in key else 20                    # B(Q) = ceil(80 / (2 Q))
        assert entry["steps"] == steps and entry["curve"][0][0] == 0 and entry["curve"][-1][0] == steps
        assert all(len(p) == 4 and p[3] is not None for p in entry["curve"]) and len(entry["curve"]) == steps + 1
        assert entry["final"]["accuracy"] is not None and entry["final"]["forward_passes"] == 80
    assert not any(output.rglob("metrics.parquet"))            # run directories go once recorded
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "speedup" and line["part"]["trained"] == first
    assert set(line["tasks"]["tiny"]["S_default"]) == {"1", "2"} and line["tasks"]["tiny"]["target"] == 0.9

    mtime = progress.stat().st_mtime_ns
    assert cli(base + ["--resume"]) == 0                       # everything recorded: nothing trains
    assert len(count_trains) == first and progress.stat().st_mtime_ns == mtime
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["part"]["reused"] == first

    changed = [a if a != "80" else "60" for a in base]       # another budget: another config, so it reruns
    assert cli(changed + ["--resume", "--phase", "default", "--q", "1"]) == 0
    assert [c[3] for c in count_trains[first:]] == [30, 30, 30] and {c[2] for c in count_trains[first:]} == {"test"}
    capsys.readouterr()

    assert cli(base + ["--report-only", "--report", str(report)]) == 0
    assert len(count_trains) == first + 3                      # the report trains nothing
    text = report.read_text()
    assert "| 1 | 40 |" in text and "| 2 | 20 |" in text and "## tiny" in text and "## What is missing" in text
    assert (report.parent / "speedup_steps.png").stat().st_size > 1000
    # the budget-60 runs replaced the Q = 1 default runs under their keys: for the budget-80 report they are
    # recorded with another config, and named as missing
    assert "tiny Q=1: default x3" in text and "(3 recorded with another config: rerun)" in text
    assert "tiny Q=2" not in text.split("## What is missing")[1]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("argv, message", [
    (["speedup", "--tasks", "rt_head,nope"], "--tasks: unknown task 'nope'"),
    (["speedup", "--q", "1,x"], "--q: 'x' is not a positive integer"),
    (["speedup", "--q", "0"], "--q: '0' is not a positive integer"),
    (["speedup", "--budget", "0"], "--budget 0"),
    (["speedup", "--pilot", "--q", "1"], "--pilot runs Q = 1 only"),
    (["step", "--q", "1"], "--q applies only to the speedup benchmark"),
    (["step", "--resume"], "--resume applies only to the speedup benchmark"),
    (["speedup", "--config", "jobs/configs/smoke.yaml"], "--config: the speedup benchmark's presets"),
    (["nope"], "unknown benchmark 'nope'"),
])
def test_cli_errors_name_the_option_and_the_fix(argv, message, capsys, tmp_path):
    assert cli(["bench", *argv, "--results", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_measured_phases_need_a_target_and_protocol_keys_are_refused(tmp_path, monkeypatch):
    import dataclasses

    from ray_s2p.bench import speedup
    # A preset whose target is not fixed yet (every shipped preset has one now).
    monkeypatch.setitem(speedup.PRESETS, "rt_head", dataclasses.replace(speedup.PRESETS["rt_head"], target=None))
    options = SpeedupOptions(tasks=("rt_head",), progress=str(tmp_path / "p.json"))
    with pytest.raises(RayS2PError, match=r"no target accuracy set.*--pilot --tasks rt_head.*TARGETS\['rt_head'\]"):
        Speedup(options).run_part()
    with pytest.raises(RayS2PError, match="--set optimizer.directions: the speedup benchmark sets this key"):
        Speedup(options, {"optimizer.directions": 4})
    with pytest.raises(RayS2PError, match="--set optimizer.eta: the step size of preset tiny"):
        Speedup(SpeedupOptions(tasks=("tiny",), progress=str(tmp_path / "p.json")), {"optimizer.eta": 1.0}).base("tiny")
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "sweeps": {}, "runs": {}}))
    with pytest.raises(RayS2PError, match="not a speedup progress file"):
        Speedup(SpeedupOptions(progress=str(tmp_path / "bad.json")))
