"""Every shipped job config loads and validates; the embedded default is what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_s2p.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


def test_there_are_job_configs():
    names = {p.stem for p in CONFIGS}
    assert {"smoke", "default", "mnist5k_cnn", "smollm2_prompt_rt"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_job_config_is_valid(path):
    config = load_config(path)
    assert config.steps > 0 and config.cluster.replicas >= 1


def test_default_yaml_equals_the_embedded_default():
    assert load_config(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "default.yaml") == load_config()


def test_embedded_default_is_minilm_rotten_tomatoes_vs2p_on_two_replicas():
    c = load_config()
    assert (c.task.model, c.task.dataset, c.optimizer.name, c.cluster.replicas, c.cluster.use_ray) == (
        "minilm", "rotten_tomatoes", "vs2p", 2, True)
