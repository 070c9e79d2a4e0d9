"""ZO-signSGD's update: every coordinate moves by exactly the step, against the sign of the summed estimate."""

from __future__ import annotations

import pytest
import torch

from conftest import TinyLM
from ray_s2p.distributed.digest import model_digest
from ray_s2p.zo import noise
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.noise import mix_seed
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config
from ray_s2p.zo.space import select_parameters
from ray_s2p.zo.update import apply_update

PAIRS = [(mix_seed(4, j), c) for j, c in enumerate([0.7, -1.3, 0.2])]
STEP = 0.01


def space_of(model: torch.nn.Module, distribution: str, threads: int = 1) -> DirectionSpace:
    names, params = select_parameters(model)
    return DirectionSpace(names, params, distribution, threads=threads, run_seed=3)


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank", "sphere"])
def test_each_coordinate_moves_by_the_step_against_the_estimate(distribution, monkeypatch):
    monkeypatch.setattr(noise, "CHUNK", 64)  # several noise chunks per weight: the estimate is formed chunk by chunk
    model = TinyLM()
    space = space_of(model, distribution)
    before = [p.detach().clone() for p in space.params]
    estimate = [sum(c * space.noise(s, i, 1) for s, c in PAIRS) for i in range(len(space.params))]
    apply_update(space, PAIRS, param_scale=1.0, step=1, sign_step=STEP)
    for i, (p, x0, g) in enumerate(zip(space.params, before, estimate)):
        moved = p.detach() - x0
        # |move| is the step everywhere (the float32 addition rounds it by at most an ulp of x)
        torch.testing.assert_close(moved.abs(), torch.full_like(moved, STEP), atol=1e-6, rtol=0)
        assert torch.equal(torch.sign(moved), -torch.sign(g)), space.names[i]


def test_sign_update_decays_first_and_ignores_the_estimate_scale():
    # x <- s x - a sign(g): multiplying every coefficient by 1000 changes g's size, not one bit of the result.
    results = []
    for factor in (1.0, 1000.0):
        model = TinyLM()
        space = space_of(model, "gaussian")
        start = [p.detach().clone() for p in space.params]
        apply_update(space, [(s, c * factor) for s, c in PAIRS], param_scale=0.5, step=1, sign_step=STEP)
        moved = [(p.detach() - 0.5 * x0).abs() for p, x0 in zip(space.params, start)]
        assert all(torch.allclose(m, torch.full_like(m, STEP), atol=1e-6) for m in moved)
        results.append(model_digest(model))
    assert results[0] == results[1]


def test_a_zero_estimate_moves_nothing_and_the_linear_update_is_unchanged():
    model = TinyLM()
    space = space_of(model, "gaussian")
    before = model_digest(model)
    apply_update(space, [(5, 0.0), (6, 0.0)], step=1, sign_step=STEP)  # g = 0: sign(0) = 0
    assert model_digest(model) == before
    linear, signed = TinyLM(), TinyLM()
    apply_update(space_of(linear, "gaussian"), PAIRS, step=1)
    apply_update(space_of(signed, "gaussian"), PAIRS, step=1, sign_step=STEP)
    assert model_digest(linear) != model_digest(signed)  # two different updates of the same pairs


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank", "table"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sign_update_is_the_same_for_any_thread_count(distribution, dtype, monkeypatch):
    # Replicas and replay must form the same estimate and the same signs: 1 or 2 threads, same bits.
    monkeypatch.setattr(noise, "CHUNK", 64)
    digests, threads_before = [], torch.get_num_threads()
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        model = TinyLM().to(dtype)
        names, params = select_parameters(model)
        table = noise.NoiseTable(1 << 12) if distribution == "table" else None
        space = DirectionSpace(names, params, distribution, table, threads=threads, run_seed=3)
        for step in (1, 2, 3):
            apply_update(space, PAIRS, param_scale=0.999, step=step, sign_step=STEP)
        digests.append(model_digest(model))
    torch.set_num_threads(threads_before)
    assert digests[0] == digests[1] == digests[2]


def test_single_process_optimizer_applies_the_sign_update():
    # ZerothOrderOptimizer with zo_signsgd: after one step every trainable coordinate moved by exactly lr.
    model = TinyLM()
    ids = torch.randint(0, 50, (8, 5), generator=torch.Generator().manual_seed(1))
    start = [p.detach().clone() for p in model.parameters()]
    opt = ZerothOrderOptimizer(model, optimizer_config(name="zo_signsgd", lr=STEP, rho=1e-3, directions=2,
                                                               step_scaling="none"), seed=0)
    record = opt.step(lambda: model(ids).pow(2).mean())
    assert record.decision.sign_step == STEP
    for p, x0 in zip(model.parameters(), start):
        torch.testing.assert_close((p.detach() - x0).abs(), torch.full_like(x0, STEP), atol=1e-6, rtol=0)
