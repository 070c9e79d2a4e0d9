"""What the command line does with an error: a project error is one line and exit 2, a bug keeps its traceback,
and --debug shows every traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_s2p.cli import main
from ray_s2p.errors import RayS2PError


def plot_argv(tmp_path):
    return ["plot", str(tmp_path), "-o", str(tmp_path / "curves.png")]  # a directory without metrics.parquet


def test_a_project_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(plot_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ray-s2p plot: error: run directory ") and "has no metrics.parquet" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback_of_a_project_error(tmp_path):
    with pytest.raises(RayS2PError, match="has no metrics.parquet"):
        main(["--debug", *plot_argv(tmp_path)])


@pytest.mark.parametrize("bug", [KeyError("internal"), ValueError("internal"), RuntimeError("internal")])
def test_a_bug_keeps_its_traceback(bug, tmp_path, monkeypatch):
    # A plain ValueError or RuntimeError from inside the library is a bug now, not a one-line user error.
    def broken(*args, **kwargs):
        raise bug
    monkeypatch.setattr("ray_s2p.plots.curves.plot_runs", broken)
    with pytest.raises(type(bug), match="internal"):
        main(plot_argv(tmp_path))


def test_every_project_error_is_still_the_builtin_type_it_was():
    from ray_s2p.config import ConfigError
    from ray_s2p.distributed.checkpoint import CheckpointError
    from ray_s2p.distributed.replica import ReplicaFailure
    from ray_s2p.zo.ledger import LedgerError
    assert issubclass(ConfigError, ValueError) and issubclass(LedgerError, ValueError)
    assert issubclass(CheckpointError, ValueError) and issubclass(ReplicaFailure, RuntimeError)
    assert all(issubclass(c, RayS2PError) for c in (ConfigError, CheckpointError, ReplicaFailure, LedgerError))


@pytest.mark.parametrize("override", ["optimizer.rho=inf", "optimizer.eta=.nan", "cluster.memory_per_replica_gb=-.inf",
                                      "optimizer.weight_decay=nan"])
def test_a_number_that_is_not_finite_is_refused_by_name_and_nothing_is_written(override, tmp_path, capsys):
    out = tmp_path / "run"
    smoke = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.yaml"
    assert main(["train", "--config", str(smoke), "--output", str(out), "--set", override]) == 2
    key, value = override.split("=")
    err = capsys.readouterr().err
    assert f"config field '{key}': " in err and "is not a finite number. Fix: write a finite number" in err
    assert not out.exists()
