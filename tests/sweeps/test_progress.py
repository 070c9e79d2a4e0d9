"""compare's progress file: finished sweeps and runs continue on another machine, and only inputs that match."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.errors import RayS2PError
from ray_s2p.sweeps import reruns as reruns_module
from ray_s2p.sweeps.compare import compare
from ray_s2p.sweeps.progress import CompareProgress, fingerprint
from ray_s2p.sweeps.tune import SweepResult


def test_fingerprint_is_canonical_and_sees_every_value():
    assert fingerprint({"a": 1, "b": [1.5, None]}) == fingerprint({"b": [1.5, None], "a": 1})
    assert fingerprint({"a": 1.0}) != fingerprint({"a": 1.0000000001})
    assert len(fingerprint({})) == 64


def test_entries_are_taken_only_under_their_own_fingerprint(tmp_path):
    path = tmp_path / "p.json"
    progress = CompareProgress.load(path)  # absent: empty, nothing written yet
    assert progress.sweeps == {} and not path.exists()
    progress.record_sweep("tune-mezo", "k1", "eval_accuracy", "max", [{"optimizer.lr": 0.01, "eval_accuracy": 0.5}])
    progress.record_run("mezo-seed0", "k2", {"final_metrics": {"eval_accuracy": 0.6}, "initial_metrics": {},
                                             "forward_passes": 40, "wall_seconds": 1.0, "steps_completed": 20,
                                             "nodes": ["not kept"]}, [(0.0, 0.1), (40.0, float("nan"))])
    again = CompareProgress.load(path)
    assert again.sweep("tune-mezo", "k1")["rows"] == [{"optimizer.lr": 0.01, "eval_accuracy": 0.5}]
    assert again.sweep("tune-mezo", "other") is None and again.sweep("tune-vs2p", "k1") is None
    run = again.run("mezo-seed0", "k2")
    assert run["summary"]["forward_passes"] == 40 and "nodes" not in run["summary"]
    assert run["curve"][0] == [0.0, 0.1] and math.isnan(run["curve"][1][1])
    assert again.run("mezo-seed0", "k1") is None


def test_a_failed_trial_keeps_only_its_error_message(tmp_path):
    traceback = ("Traceback (most recent call last):\n  File \"/home/someone/env/ray/tune/trial.py\", line 9\n"
                 "    raise exc\nray.exceptions.RayTaskError(ValueError): ray::_trainable()\n"
                 "ValueError: loss is nan at step 12. Fix: lower optimizer.lr\n")
    progress = CompareProgress.load(tmp_path / "p.json")
    progress.record_sweep("tune-stp", "k", "eval_accuracy", "max", [{"optimizer.lr": 1.0, "error": traceback},
                                                                     {"optimizer.lr": 0.1, "error": None}])
    rows = CompareProgress.load(tmp_path / "p.json").sweep("tune-stp", "k")["rows"]
    assert rows == [{"optimizer.lr": 1.0, "error": "ValueError: loss is nan at step 12. Fix: lower optimizer.lr"},
                    {"optimizer.lr": 0.1, "error": None}]
    assert "/home/" not in (tmp_path / "p.json").read_text()


@pytest.mark.parametrize("text, message", [("{not json", "is unreadable"), ('{"version": 99}', "has version 99"),
                                           ("[1, 2]", "has version 'list'")])
def test_a_foreign_progress_file_is_refused_and_kept(tmp_path, text, message):
    path = tmp_path / "progress.json"
    path.write_text(text)
    with pytest.raises(RayS2PError, match=message + r".*Fix: .*move it away"):
        CompareProgress.load(path)
    with pytest.raises(RayS2PError, match=message):
        compare(RunConfig.from_dict(smoke_dict(**{"task.test_size": 64})), tmp_path, variants=["mezo"], budget=20,
                trials=1, seeds=[0], target=0.5, ablations=False)
    assert path.read_text() == text


def fake_sweep(calls: list):
    """run_sweep without Ray: validation accuracy peaks at lr 0.01; lr above 0.2 diverges (a failed trial)."""
    def run(cfg, storage, *, name, points, trial_overrides, **kwargs):
        calls.append(name)
        rows = [{"optimizer": cfg.optimizer.name, "steps": 20, **p, "split": "validation", "error": None,
                 "eval_accuracy": 0.9 - 0.1 * abs(math.log10(p["optimizer.lr"] / 0.01))} for p in points]
        for row in rows:
            if row["optimizer.lr"] > 0.2:
                row.update({"eval_accuracy": None, "error": "TrainingError: 20 steps in a row had only non-finite "
                                                            "losses"})
        return SweepResult(rows, "eval_accuracy", "max")
    return run


def test_a_comparison_continues_from_its_progress_file_alone(tmp_path, monkeypatch):
    # Machine A runs the comparison; machine B has only progress.json. B's resume trains nothing and
    # reports the same rows; a changed budget is run again, never answered from the old entries.
    calls: list = []
    monkeypatch.setattr("ray_s2p.sweeps.tune.run_sweep", fake_sweep(calls))
    base = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "checkpoint_every": 0, "task.test_size": 128}))
    kwargs = {"variants": ["mezo"], "budget": 40, "trials": 5, "seeds": [0, 1], "target": 0.55, "ablations": False,
              "eval_points": 4}
    first = compare(base, tmp_path / "a", **kwargs)
    assert len(calls) == 2  # the grid, then its refinement
    assert len(first.failures) == 1 and first.failures[0].startswith("tuning mezo lr=0.398: TrainingError")
    saved = json.loads((tmp_path / "a" / "progress.json").read_text())
    assert sorted(saved["sweeps"]) == ["tune-mezo", "tune-mezo-refine"] and sorted(saved["runs"]) == \
        ["mezo-seed0", "mezo-seed1"]

    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "progress.json", tmp_path / "b" / "elsewhere.json")
    calls.clear()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(reruns_module, "_train_one", no_training)
    second = compare(base, tmp_path / "b", resume=True, progress=tmp_path / "b" / "elsewhere.json", **kwargs)
    assert calls == [] and second.failures == first.failures  # the diverged trial is recorded, not retried
    keys = ("variant", "seed", "test_accuracy", "initial_test_accuracy", "forward_passes", "passes_to_target")
    assert [[r[k] for k in keys] for r in second.rows] == [[r[k] for k in keys] for r in first.rows]
    assert second.rows[0]["curve"] == [list(p) for p in first.rows[0]["curve"]]
    assert (tmp_path / "b" / "curves.png").stat().st_size > 10_000  # drawn from the recorded curves
    assert not (tmp_path / "b" / "runs").exists()

    with pytest.raises(AssertionError, match="trained again"):  # another budget: other trials, other runs
        compare(base, tmp_path / "b", resume=True, progress=tmp_path / "b" / "elsewhere.json",
                **(kwargs | {"budget": 48}))
    assert calls == ["tune-mezo", "tune-mezo-refine"]


def test_without_resume_the_progress_file_is_written_not_read(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("ray_s2p.sweeps.tune.run_sweep", fake_sweep(calls))
    base = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "checkpoint_every": 0, "task.test_size": 128}))
    kwargs = {"variants": ["mezo"], "budget": 40, "trials": 5, "seeds": [0], "target": 0.55, "ablations": False,
              "eval_points": 4}
    compare(base, tmp_path / "a", **kwargs)
    compare(base, tmp_path / "a", **kwargs)
    assert calls == ["tune-mezo", "tune-mezo-refine"] * 2


def test_report_only_trains_nothing_and_names_what_is_not_recorded(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("ray_s2p.sweeps.tune.run_sweep", fake_sweep(calls))
    base = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "checkpoint_every": 0, "task.test_size": 128}))
    kwargs = {"budget": 40, "trials": 5, "seeds": [0, 1], "target": 0.55, "ablations": False, "eval_points": 4}
    first = compare(base, tmp_path / "a", variants=["mezo"], **kwargs)
    saved = tmp_path / "a" / "progress.json"
    calls.clear()

    def no_training(*args, **kwargs):
        raise AssertionError("report-only trained a run")
    monkeypatch.setattr(reruns_module, "_train_one", no_training)
    # vs2p (two passes a step, as mezo: the same evaluation interval) was never run: left out and named;
    # mezo is reported from the file alone, with the same numbers.
    report = compare(base, tmp_path / "b", variants=["vs2p", "mezo"], progress=saved, train=False, **kwargs)
    assert calls == [] and not (tmp_path / "b" / "runs").exists()
    assert report.missing == ["vs2p: sweep tune-vs2p not recorded"]
    assert [t.name for t in report.tuned] == ["mezo"]
    assert [r["test_accuracy"] for r in report.rows] == [r["test_accuracy"] for r in first.rows]
    assert "mezo" in (tmp_path / "b" / "summary.md").read_text()

    # a rule tuned but with one rerun missing: its tuning is reported, its runs are not
    data = json.loads(saved.read_text())
    del data["runs"]["mezo-seed1"]
    saved.write_text(json.dumps(data))
    partial = compare(base, tmp_path / "c", variants=["mezo"], progress=saved, train=False, **kwargs)
    assert partial.missing == ["mezo: run mezo-seed1 not recorded"]
    assert [t.name for t in partial.tuned] == ["mezo"] and partial.rows == []
    assert "lr" in (tmp_path / "c" / "tuning.md").read_text() and calls == []
