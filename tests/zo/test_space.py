"""One place builds a direction space from settings: the plain optimizer and the trainer's replicas agree
by construction (defaults, table size, noise threads, directions)."""

from __future__ import annotations

import pytest
import torch

from conftest import TinyLM
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.engine import build_space as trainer_space
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config


def test_the_plain_optimizer_takes_the_trainers_defaults():
    opt = ZerothOrderOptimizer(TinyLM(0), optimizer_config(name="mezo", lr=1e-3))
    assert opt.perturbation == RunConfig().perturbation
    assert opt.space.threads == max(1, torch.get_num_threads())  # the trainer's noise threads on a CPU


@pytest.mark.parametrize("distribution", ["gaussian", "table", "lowrank"])
def test_the_plain_optimizer_draws_the_trainers_directions(distribution):
    cfg = RunConfig.from_dict({"seed": 5, "perturbation": {"distribution": distribution, "table_size": 4096}})
    model = TinyLM(0)
    names = [n for n, _ in model.named_parameters()]
    plain = ZerothOrderOptimizer(model, cfg.optimizer, seed=cfg.seed, perturbation=cfg.perturbation).space
    trainer = trainer_space(TinyLM(0), names, cfg)
    assert plain.names == trainer.names and plain.threads == trainer.threads
    if distribution == "table":
        assert plain.table.values.numel() == trainer.table.values.numel() == 4096
    for seed in (11, 12):
        for i in range(len(plain.params)):
            assert torch.equal(plain.noise(seed, i, step=1), trainer.noise(seed, i, step=1))


def test_a_perturbation_field_overrides_and_a_wrong_one_is_named():
    opt = ZerothOrderOptimizer(TinyLM(0), optimizer_config(), distribution="lowrank", rank=3)
    assert opt.perturbation.distribution == "lowrank" and opt.perturbation.rank == 3
    with pytest.raises(ConfigError, match="unknown perturbation field 'table_sise'.*table_size"):
        ZerothOrderOptimizer(TinyLM(0), optimizer_config(), table_sise=1 << 20)
    with pytest.raises(ConfigError, match="'perturbation.distribution'.*use gaussian, rademacher"):
        ZerothOrderOptimizer(TinyLM(0), optimizer_config(), distribution="uniform")
