"""`ray-s2p compare` and `tune`: equal budgets, validation for tuning and test for tables, grids that extend at
their edge, one evaluation spacing for all, the tables, --resume, and a non-zero exit when anything failed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import smoke_dict
from ray_s2p.cli import main
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.driver import train
from ray_s2p.sweeps.compare import (
    ABLATIONS,
    ALIASES,
    ALL_OPTIMIZERS,
    compare,
    default_variants,
    tune_variant,
    variant_overrides,
)
from ray_s2p.sweeps.protocol import refinement
from ray_s2p.sweeps.report import tuning_summary
from ray_s2p.sweeps.tune import SweepResult, passes_per_step, run_sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", ALL_OPTIMIZERS + list(ABLATIONS) + list(ALIASES))
def test_budget_counts_what_a_run_spends(tmp_path, variant):
    # The equal-budget comparison sets steps = budget // passes_per_step: the count must be what the
    # driver really spends per step (follow-up rounds, STP's f(x), q directions included; a first-order
    # step counts 3 forward-pass equivalents in both).
    overrides = dict(ABLATIONS[variant], **{"optimizer.name": "vs2p"}) if variant in ABLATIONS else \
        variant_overrides(variant)
    cfg = RunConfig.from_dict(smoke_dict(steps=4, checkpoint_every=0, eval_every=0, **{"cluster.replicas": 1})) \
        .replace(overrides)
    result = train(cfg, tmp_path / variant, log=lambda m: None)
    assert result.summary["forward_passes"] == 4 * passes_per_step(cfg)


@pytest.mark.parametrize("mode", ["direction", "data"])
def test_budget_counts_every_replica(tmp_path, mode):
    # Two replicas probe two batches (data) or two directions (direction) per step: both are spent.
    cfg = RunConfig.from_dict(smoke_dict(steps=3, checkpoint_every=0, eval_every=0, **{
        "cluster.replicas": 2, "cluster.mode": mode, "optimizer.name": "zo_signsgd", "optimizer.directions": 2}))
    result = train(cfg, tmp_path / mode, log=lambda m: None)
    assert passes_per_step(cfg) == 8 and result.summary["forward_passes"] == 3 * 8


def test_refinement_adds_the_log_midpoints_around_the_best():
    # MeZO's low-rank Rotten Tomatoes grid: 2.5e-4 kept the start accuracy, 1.6e-3 diverged; the
    # midpoint 6.3e-4 is what a twice-as-dense grid would have tried.
    grid = [1e-5, 1e-4, 1e-3, 1e-2]
    assert refinement(grid, 2) == pytest.approx([10 ** -3.5, 10 ** -2.5])
    assert refinement(grid, 0) == pytest.approx([10 ** -4.5]) and refinement(grid[::-1], 3) == [pytest.approx(10 ** -2.5)]
    assert refinement([0.5], 0) == []
    with pytest.raises(IndexError, match="best index 4 is outside a grid of 4 values"):
        refinement(grid, 4)


def test_every_rule_is_listed_once():
    # zo_sign is S2P option 1 with the sign trick, s2p_opt2 is MeZO: the default list holds neither alias.
    assert not set(ALIASES) & set(ALL_OPTIMIZERS) and set(ALIASES.values()) <= set(ALL_OPTIMIZERS)
    assert "zo_signsgd" in ALL_OPTIMIZERS and len(set(ALL_OPTIMIZERS)) == len(ALL_OPTIMIZERS)
    # With one direction per step random search is S2P option 1 at twice the lr (tests/zo/test_step_rules.py):
    # left out of the default list, with the reason; with more directions per step it is its own rule.
    one = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "optimizer.directions": 1}))
    names, why = default_variants(one)
    assert names == [n for n in ALL_OPTIMIZERS if n != "random_search"] and "s2p_opt1 at twice the lr" in why
    for more in ({"cluster.replicas": 2, "optimizer.directions": 1},
                 {"cluster.replicas": 1, "optimizer.directions": 4}):
        assert default_variants(RunConfig.from_dict(smoke_dict(**more))) == (ALL_OPTIMIZERS, None)


def fake_sweep(peak: float, calls: list):
    """A stand-in for run_sweep: the validation accuracy of a step size peaks at ``peak`` (no Ray)."""
    def run(cfg, storage, *, name, points, trial_overrides, **kwargs):
        assert cfg.task.eval_split == "validation" and trial_overrides == {"eval_every": 0, "log_every": 40 // passes_per_step(cfg)}
        calls.append(name)
        rows = [{"optimizer": cfg.optimizer.name, "steps": 10, **p, "split": "validation", "error": None,
                 "eval_accuracy": 0.9 - 0.1 * abs(math.log10(p["optimizer.lr"] / peak))} for p in points]
        return SweepResult(rows, "eval_accuracy", "max")
    return run


@pytest.mark.parametrize("peak, sides, on_edge", [(1e-2, [], None), (0.4, ["upper"], None),
                                                  (1e3, ["upper", "upper"], "upper"), (1e-9, ["lower", "lower"], "lower")])
def test_grid_extends_at_its_edge_at_most_twice(tmp_path, monkeypatch, peak, sides, on_edge):
    calls: list = []
    monkeypatch.setattr("ray_s2p.sweeps.tune.run_sweep", fake_sweep(peak, calls))
    base = RunConfig.from_dict(smoke_dict(**{"task.test_size": 64}))
    tuned = tune_variant(base, "mezo", tmp_path, trials=5, budget=40, seed=0)  # lr grid over 1e-4 .. 1
    assert tuned.extensions == sides and tuned.on_edge == on_edge
    refined = 1 if on_edge else 2  # a best on an edge has one neighbour to refine towards
    assert tuned.refined == refined and calls[-1] == "tune-mezo-refine"
    assert tuned.points == 5 + 2 * len(sides) + refined and len(calls) == 2 + len(sides)
    grid = sorted(t["step_size"] for t in tuned.trials if t["round"] <= len(sides))
    ratios = {round(b / a, 6) for a, b in zip(grid, grid[1:])}
    assert len(ratios) == 1  # the extended grid is still log-spaced
    steps = sorted(t["step_size"] for t in tuned.trials)
    assert len(set(steps)) == len(steps)  # the refinement's midpoints are new points
    assert tuned.overrides["optimizer.lr"] == max(tuned.trials, key=lambda t: t["value"])["step_size"]
    text = tuning_summary([tuned], 5)
    if sides:
        assert f"extended {sides[0]} (+2)" in text
    assert f"refined around the best (+{refined})" in text
    assert ("best still on the" in text) == (on_edge is not None)


def test_a_step_range_places_the_first_grid(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("ray_s2p.sweeps.tune.run_sweep", fake_sweep(3e-6, calls))
    base = RunConfig.from_dict(smoke_dict(**{"task.test_size": 64}))
    tuned = tune_variant(base, "mezo", tmp_path, trials=5, budget=40, seed=0, step_range=(1e-7, 1e-4))
    first = sorted(t["step_size"] for t in tuned.trials if t["round"] == 0)
    assert len(first) == 5 and 1e-7 < first[0] < first[-1] < 1e-4
    assert tuned.extensions == [] and math.isclose(tuned.overrides["optimizer.lr"], 3.162e-6, rel_tol=0.01)


@pytest.mark.parametrize("value", ["mezo=1e-4", "mezo=1e-3:1e-4", "=1:2", "mezo=a:b"])
def test_a_bad_step_range_is_one_line_naming_the_form(tmp_path, value, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(smoke_dict(**{"task.test_size": 64})))
    with pytest.raises(SystemExit, match="NAME=LOW:HIGH with 0 < LOW < HIGH"):
        main(["compare", "--config", str(config), "--output", str(tmp_path / "out"), "--budget", "40",
              "--range", value, "--report-only"])


def test_tune_refuses_to_read_the_test_split(tmp_path):
    base = RunConfig.from_dict(smoke_dict(**{"task.test_size": 64, "task.eval_split": "test"}))
    with pytest.raises(ConfigError, match="tuning reads the validation split only"):
        run_sweep(base, tmp_path, budget=20)


def test_compare_needs_a_test_split(tmp_path):
    with pytest.raises(ValueError, match="task.test_size is 0. Fix: set task.test_size"):
        compare(RunConfig.from_dict(smoke_dict()), tmp_path, variants=["vs2p"], budget=20, trials=1, seeds=[0],
                target=0.5)


def test_compare_tunes_on_validation_reports_test_and_resume_reruns_only_what_changed(tmp_path, ray_session,
                                                                                     capsys):
    base = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "checkpoint_every": 0, "eval_every": 10,
                                             "task.test_size": 256}))
    kwargs = dict(variants=["vs2p", "sgd"], budget=96, trials=1, seeds=[0, 1], target=0.6, eval_points=4)
    result = compare(base, tmp_path / "cmp", **kwargs)
    rows = result.rows
    assert result.failures == []
    assert [r["variant"] for r in rows] == ["vs2p"] * 2 + ["sgd"] * 2 + [a for a in ABLATIONS for _ in range(2)]
    for r in rows:  # every run spent the budget, up to one step (first-order steps count 3 forward passes)
        assert 96 - 8 < r["forward_passes"] <= 96, r
        assert r["split"] == "test" and 0.0 <= r["test_accuracy"] <= 1.0
        stored = RunConfig.from_dict(yaml.safe_load(Path(r["run_dir"], "config.yaml").read_text()))
        assert stored.task.eval_split == "test"
        # one evaluation interval for every optimizer: 24 passes (lcm of 2, 3, 4 and 8 passes per step)
        evals = [e["forward_passes"] for e in pq.read_table(Path(r["run_dir"], "metrics.parquet")).to_pylist()
                 if e["kind"] == "eval"]
        assert evals[:4] == [0, 24, 48, 72] and r["eval_interval"] == 24
    # tuning read validation: the tuning value is the validation accuracy of the chosen settings at seed 0
    vs2p = next(t for t in result.tuned if t.name == "vs2p")
    check = train(base.replace(vs2p.overrides | {"seed": 0, "progress": False}), tmp_path / "check",
                  log=lambda m: None)
    assert vs2p.trials[0]["split"] == "validation"
    assert vs2p.trials[0]["value"] == check.summary["final_metrics"]["eval_accuracy"]
    summary = (tmp_path / "cmp" / "summary.md").read_text()
    assert summary.startswith("Test split; 96 forward passes per run; evaluation every 24 forward passes")
    assert "| vs2p_q4 | 2 |" in summary and "resolution 24 passes" in summary
    assert "| sgd | 2 |" in summary.split("VS2P against each other variant")[1]  # the paired table
    tuning = (tmp_path / "cmp" / "tuning.md").read_text()
    assert "| vs2p | eta | 1 points |" in tuning and "fewer than the protocol's 5" in tuning
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 10_000
    assert pq.read_table(tmp_path / "cmp" / "results.parquet").num_rows == len(rows)
    assert pq.read_table(tmp_path / "cmp" / "tuning.parquet").column("split").to_pylist() == ["validation"] * 2

    # --resume from the run directories alone (an output without its progress file): identical finished
    # runs are reused and recorded again; a run whose files are gone is run again.
    stamps = {r["run_dir"]: Path(r["run_dir"], "summary.json").stat().st_mtime_ns for r in rows}
    gone = rows[1]["run_dir"]
    Path(gone, "summary.json").unlink()
    (tmp_path / "cmp" / "progress.json").unlink()
    capsys.readouterr()
    again = compare(base, tmp_path / "cmp", resume=True, **kwargs).rows
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("compare --resume:")]
    assert said == [f"compare --resume: {gone} holds no finished run of this config; running it again"]
    assert [(r["variant"], r["seed"], r["test_accuracy"]) for r in again] == \
        [(r["variant"], r["seed"], r["test_accuracy"]) for r in rows]
    rerun = [d for d, t in stamps.items() if d == gone or Path(d, "summary.json").stat().st_mtime_ns != t]
    assert rerun == [gone]
    recorded = json.loads((tmp_path / "cmp" / "progress.json").read_text())["runs"]
    assert sorted(recorded) == sorted(Path(r["run_dir"]).name for r in rows)


def test_tune_and_compare_exit_non_zero_with_one_line_when_a_trial_failed(tmp_path, ray_session, capsys):
    # sgd needs one replica; on two its trials fail while vs2p's succeed.
    common = ["--config", str(REPO / "jobs" / "configs" / "smoke.yaml"), "--set", "cluster.use_ray=false",
              "--set", "checkpoint_every=0", "--set", "task.test_size=64", "--optimizers", "vs2p,sgd",
              "--trials", "1", "--budget", "24"]
    assert main(["tune", *common, "--storage", str(tmp_path / "tune"), "--name", "t"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray-s2p tune: 1 of 2 trials failed; first: sgd lr=")
    assert "run on one replica" in err[0]
    assert main(["compare", *common, "--output", str(tmp_path / "cmp"), "--seeds", "0", "--no-ablations",
                 "--target", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray-s2p compare: 1 of 2 tuning trials and 0 of 1 runs failed "
                                               "(sgd not rerun); first: tuning sgd lr=")
    assert "(and 1 more)" in err[0]
    assert [r["variant"] for r in pq.read_table(tmp_path / "cmp" / "results.parquet").to_pylist()] == ["vs2p"]
    # --report-only trains nothing and reports the same, from the progress file
    (tmp_path / "cmp" / "summary.md").unlink()
    assert main(["compare", *common, "--output", str(tmp_path / "cmp"), "--seeds", "0", "--no-ablations",
                 "--target", "0.5", "--report-only"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == err
    assert (tmp_path / "cmp" / "summary.md").is_file()


@pytest.mark.parametrize("split", ["validation", "test"])
def test_metrics_say_which_split_each_evaluation_read(tmp_path, split):
    # A curve's numbers carry their split, so a test curve cannot be mistaken for a tuning one.
    cfg = RunConfig.from_dict(smoke_dict(steps=4, checkpoint_every=0, eval_every=2, **{
        "cluster.replicas": 1, "task.test_size": 64, "task.eval_split": split}))
    train(cfg, tmp_path / split, log=lambda m: None)
    rows = pq.read_table(tmp_path / split / "metrics.parquet").to_pylist()
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and {r["eval_split"] for r in evals} == {split}
    assert all(r["eval_split"] is None for r in rows if r["kind"] == "train")


def test_parallel_reruns_train_the_same_runs_as_one_after_another(tmp_path, ray_session):
    # Two seeds at once, each in a one-CPU Ray task: the same configs, the same final weights, the same rows.
    from ray_s2p.sweeps.reruns import run_seeds

    base = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "checkpoint_every": 0, "task.test_size": 128,
                                             "cluster.threads_per_replica": 1}))
    tuned = {"optimizer.name": "vs2p", "optimizer.eta": 2.0, "steps": 12}
    one, two = (run_seeds(base, "vs2p", tuned, [0, 1], tmp_path / name, 0.6, 8, parallel=n)
                for name, n in (("one", 1), ("two", 2)))
    assert [r["seed"] for r in two] == [0, 1] and all(r["error"] is None for r in one + two)
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k not in ("run_dir", "wall_seconds")} == \
            {k: v for k, v in b.items() if k not in ("run_dir", "wall_seconds")}
        digests = [json.loads(Path(r["run_dir"], "summary.json").read_text())["final_digest"] for r in (a, b)]
        assert digests[0] == digests[1]
    assert one[0]["test_accuracy"] != one[1]["test_accuracy"] or one[0]["test_loss"] != one[1]["test_loss"]
    with pytest.raises(SystemExit):
        main(["compare", "--config", str(REPO / "jobs/configs/smoke.yaml"), "--output", str(tmp_path / "x"),
              "--budget", "10", "--parallel-runs", "0"])


def test_a_restored_failed_trial_keeps_its_step_size(tmp_path):
    # Tuner.restore(...).get_results() gives an errored trial no config; its params.json still names the
    # point, and the failed point must stay in the grid (the worst point), not vanish from it.
    from types import SimpleNamespace

    (tmp_path / "params.json").write_text(json.dumps({"point": {"optimizer.name": "mezo", "steps": 20,
                                                                "optimizer.lr": 0.0631}}))
    failed = SimpleNamespace(config=None, path=str(tmp_path), metrics={}, error=RuntimeError("non-finite losses"))
    done = SimpleNamespace(config={"point": {"optimizer.name": "mezo", "steps": 20, "optimizer.lr": 0.01}},
                           path=None, metrics={"eval_accuracy": 0.4, "forward_passes": 40}, error=None)
    rows = SweepResult.from_results([done, failed], "eval_accuracy", "max").rows
    assert [(r["optimizer.lr"], r["eval_accuracy"], r["error"]) for r in rows] == \
        [(0.01, 0.4, None), (0.0631, None, "non-finite losses")]
