"""Renamed config keys: accepted under the old name with a deprecation line, loaded from old run directories, and hashed under the
old name so that recorded results, progress entries and checkpoints stay valid."""

from __future__ import annotations

import warnings

import pytest

from ray_s2p.bench.speedup_runs import run_fingerprint
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.config_history import saved_config, trajectory_dict
from ray_s2p.distributed.checkpoint import config_fingerprint
from ray_s2p.sweeps.progress import fingerprint

# Computed by the version before task.precision became task.autocast, for the config in ``renamed``.
BEFORE_RENAME = {
    "checkpoint": "1ac027c2c77218895f6fe0993dadda827f9d4b343ed2f3adaf1bc4e630583051",
    "trajectory": "24bdaedaebbe98745c7e0daf5f94877afe4bc63340b4a6b6d3f321b43b4a1395",
    "speedup_run": "632a26200805485af5742c49af0e30d19449cafd4e780fd3a4ab427f32d55dca",
}


def renamed() -> RunConfig:
    return RunConfig.from_dict({"task": {"autocast": "bf16"}, "optimizer": {"directions": 4}})


def test_the_old_name_still_works_with_a_deprecation_line() -> None:
    with pytest.warns(FutureWarning, match=r"'task\.precision' is deprecated: it is now 'task\.autocast'.*Fix: write "
                                          r"task\.autocast"):
        cfg = RunConfig.from_dict({"task": {"precision": "bf16"}})
    assert cfg.task.autocast == "bf16"
    with pytest.warns(FutureWarning, match="is now 'task.autocast'"):
        assert RunConfig().replace({"task.precision": "fp16"}).task.autocast == "fp16"
    with pytest.raises(ConfigError, match=r"'task\.precision': the old name of 'task\.autocast', and both are given"):
        RunConfig.from_dict({"task": {"precision": "bf16", "autocast": "bf16"}})


def test_an_old_run_directory_config_loads_under_the_new_name() -> None:
    old = RunConfig().to_dict()
    del old["task"]["autocast"]
    old["task"]["precision"] = "fp16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own file is not the user's mistake: no deprecation line
        assert saved_config(old).task.autocast == "fp16"


def test_fingerprints_are_those_recorded_before_the_rename() -> None:
    cfg = renamed()
    assert config_fingerprint(cfg.to_dict()) == BEFORE_RENAME["checkpoint"]
    assert fingerprint(trajectory_dict(cfg)) == BEFORE_RENAME["trajectory"]
    assert run_fingerprint(cfg) == BEFORE_RENAME["speedup_run"]
    # and the setting still counts: another autocast is another trajectory
    other = cfg.replace({"task.autocast": "fp16"})
    assert config_fingerprint(other.to_dict()) != BEFORE_RENAME["checkpoint"]
