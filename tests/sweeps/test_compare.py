"""`ray-s2p compare`: equal budgets that hold for every variant, the tables, and --resume."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.driver import train
from ray_s2p.sweeps.compare import ABLATIONS, ALL_OPTIMIZERS, compare, variant_overrides
from ray_s2p.sweeps.tune import passes_per_step


@pytest.mark.parametrize("variant", ALL_OPTIMIZERS + list(ABLATIONS))
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


def test_compare_writes_tables_and_resume_reruns_only_what_changed(tmp_path, ray_session):
    base = RunConfig.from_dict(smoke_dict(**{"cluster.replicas": 1, "checkpoint_every": 0, "eval_every": 10}))
    kwargs = dict(variants=["vs2p", "sgd"], budget=60, trials=1, seeds=[0, 1], target=0.6)
    rows = compare(base, tmp_path / "cmp", **kwargs)
    names = [r["variant"] for r in rows]
    assert names == ["vs2p"] * 2 + ["sgd"] * 2 + [a for a in ABLATIONS for _ in range(2)]
    for r in rows:  # every run spent the budget, up to one step (first-order steps count 3 forward passes)
        assert 60 - 8 < r["forward_passes"] <= 60, r
        assert r["final_accuracy"] is not None and 0.0 <= r["final_accuracy"] <= 1.0
    nsign = [r for r in rows if r["variant"] == "vs2p_no_sign_trick"]
    assert all(r["forward_passes"] == 60 for r in nsign)  # 15 steps of 4 passes, not 30 steps
    summary = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| vs2p_q4 |" in summary and "forward passes to 60%" in summary
    tuning = (tmp_path / "cmp" / "tuning.md").read_text().splitlines()
    assert tuning[2].startswith("| vs2p | eta | ") and tuning[3].startswith("| sgd | lr | ")
    assert len(tuning) == 4 and tuning[2].count(": ") == 1  # one trial each
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 10_000
    assert pq.read_table(tmp_path / "cmp" / "results.parquet").num_rows == len(rows)

    # --resume: identical finished runs are reused; a run whose files are gone is run again.
    stamps = {r["run_dir"]: Path(r["run_dir"], "summary.json").stat().st_mtime_ns for r in rows}
    gone = rows[1]["run_dir"]
    Path(gone, "summary.json").unlink()
    again = compare(base, tmp_path / "cmp", resume=True, **kwargs)
    assert [(r["variant"], r["seed"], r["final_accuracy"]) for r in again] == \
        [(r["variant"], r["seed"], r["final_accuracy"]) for r in rows]
    rerun = [d for d, t in stamps.items() if d == gone or Path(d, "summary.json").stat().st_mtime_ns != t]
    assert rerun == [gone]
    assert not any(math.isnan(r["final_accuracy"]) for r in again)
