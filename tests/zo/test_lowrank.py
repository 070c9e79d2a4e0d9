"""Low-rank directions: valid two-point directions, probes that never touch W, one-product updates."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TinyLM
from ray_s2p.distributed.digest import model_digest
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.noise import mix_seed
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config
from ray_s2p.zo.probes import Prober
from ray_s2p.zo.space import select_parameters
from ray_s2p.zo.update import apply_update


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (8, 5), generator=gen), torch.randint(0, 4, (8,), generator=gen)


def lowrank_space(model: torch.nn.Module, rank: int = 2, interval: int = 1) -> DirectionSpace:
    names, params = select_parameters(model)
    return DirectionSpace(names, params, "lowrank", rank=rank, lowrank_interval=interval, run_seed=7)


def test_lowrank_entries_have_unit_variance_and_no_correlation():
    # Z = U V^T / sqrt(r): E[Z_ab] = 0, E[Z_ab^2] = 1, E[Z_ab Z_cd] = 0 for (a, b) != (c, d).
    weight = torch.nn.Parameter(torch.zeros(6, 5))
    space = DirectionSpace(["w"], [weight], "lowrank", rank=3)
    samples = torch.stack([space.noise(mix_seed(3, k), 0).reshape(-1) for k in range(20000)]).double()
    cov = samples.T @ samples / samples.shape[0]
    assert samples.mean().abs() < 0.02
    assert torch.allclose(torch.diagonal(cov), torch.ones(30, dtype=torch.float64), atol=0.06)
    off = cov - torch.diag(torch.diagonal(cov))
    assert off.abs().max() < 0.06


def test_hooked_lowrank_probe_equals_the_materialised_direction_and_leaves_weights_intact():
    model = TinyLM()
    ids, _ = batch()
    space = lowrank_space(model)
    assert [space.is_lowrank(i) for i in range(len(space.params))] == [True, True, False, True, False, False, False]
    before = model_digest(model)
    fn = lambda: model(ids).pow(2).mean()  # noqa: E731
    hooked = Prober(model, space, "hooks").evaluate(fn, 11, 0.05)
    swapped = Prober(model, space, "swap").evaluate(fn, 11, 0.05)
    assert model_digest(model) == before  # W never changed, not even by a rounding
    assert hooked == pytest.approx(swapped, rel=1e-5)
    with torch.no_grad():
        assert hooked != pytest.approx(float(fn()), rel=1e-4)  # the probe did perturb


def test_lowrank_update_equals_the_sum_of_materialised_directions_and_is_thread_independent():
    pairs = [(mix_seed(5, j), c) for j, c in enumerate([0.02, -0.01, 0.005, 0.0])]
    digests = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = TinyLM()
        space = lowrank_space(model)
        apply_update(space, pairs, param_scale=0.999)
        digests.append(model_digest(model))
    torch.set_num_threads(2)
    assert digests[0] == digests[1]
    reference = TinyLM()
    ref_space = lowrank_space(reference)
    with torch.no_grad():
        for i, p in enumerate(ref_space.params):
            p.mul_(0.999)
            for seed, c in pairs:
                p.add_(ref_space.noise(seed, i), alpha=c)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_lazy_v_update_is_one_product_equal_to_the_sum_of_directions():
    # Every direction of a window shares V, so the update collapses to (sum_i c_i U_i) V^T.
    pairs = [(mix_seed(6, j), c) for j, c in enumerate([0.03, -0.02, 0.01])]
    model, reference = TinyLM(), TinyLM()
    space, ref_space = lowrank_space(model, interval=4), lowrank_space(reference, interval=4)
    assert torch.equal(space.factors(pairs[0][0], 1, 5)[1], space.factors(pairs[1][0], 1, 5)[1])
    apply_update(space, pairs, step=5)
    with torch.no_grad():
        for i, p in enumerate(ref_space.params):
            for seed, c in pairs:
                p.add_(ref_space.noise(seed, i, 5), alpha=c)
    for a, b, untouched in zip(model.parameters(), reference.parameters(), TinyLM().parameters()):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.equal(a, untouched)


def test_lazy_v_keeps_v_for_the_interval_and_needs_the_step():
    space = lowrank_space(TinyLM(), interval=3)
    v = [space.factors(mix_seed(9, step), 1, step)[1] for step in (1, 2, 3, 4)]
    assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2]) and not torch.equal(v[2], v[3])
    u = [space.factors(mix_seed(9, step), 1, step)[0] for step in (1, 2)]
    assert not torch.equal(u[0], u[1])  # U is fresh with every direction
    with pytest.raises(ValueError, match="needs the step"):
        space.factors(1, 1)


@pytest.mark.parametrize("interval", [1, 4])
def test_plain_pytorch_optimizer_with_lowrank_directions_lowers_the_loss(interval):
    model = TinyLM()
    ids, labels = batch()
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(ids), labels)  # noqa: E731
    start = float(loss_fn())
    opt = ZerothOrderOptimizer(model, optimizer_config(name="mezo", lr=0.05, rho=1e-3, directions=4), seed=0,
                               total_steps=300, distribution="lowrank", rank=2, lowrank_interval=interval)
    for _ in range(300):
        opt.step(loss_fn)
    assert float(loss_fn()) < 0.8 * start


def test_rademacher_directions_are_signs_with_balanced_halves():
    names, params = select_parameters(TinyLM())
    space = DirectionSpace(names, params, "rademacher")
    z = torch.cat([space.noise(s, 0).reshape(-1) for s in range(20)])
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())  # 4 standard errors
    assert torch.equal(space.noise(3, 0), space.noise(3, 0)) and not torch.equal(space.noise(3, 0), space.noise(4, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["linear", "embedding"])
def test_half_layer_delta_is_added_in_the_layers_dtype(dtype, layer):
    # bf16: one addmm_ into the module's own output (no output-sized temporary, no float32 copy of the
    # activations); fp16 keeps a float32 delta rounded once. Both within a few of the dtype's ulps of
    # the float32 delta, and the weight is never touched.
    from ray_s2p.zo.lowrank import add_output_delta
    gen = torch.Generator().manual_seed(3)
    if layer == "linear":
        module = torch.nn.Linear(48, 40).to(dtype)
        x = torch.randn(4, 6, 48, generator=gen).to(dtype)
    else:
        module = torch.nn.Embedding(50, 40).to(dtype)
        x = torch.randint(0, 50, (4, 6), generator=gen)
    rows, cols = module.weight.shape
    u, v = torch.randn(rows, 2, generator=gen), torch.randn(cols, 2, generator=gen)
    weight = module.weight.detach().clone()
    with torch.no_grad():
        output = module(x)
        plain = output.float()  # copied before the delta goes in
        result = add_output_delta(module, (x,), output, u, v, 0.05)
    z = (u @ v.T) / math.sqrt(2)
    expected = plain + 0.05 * (torch.nn.functional.embedding(x, z) if layer == "embedding"
                               else x.float() @ z.T)
    assert result.dtype == dtype
    assert (result is output) == (dtype == torch.bfloat16)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert (result.float() - expected).abs().max() <= 2 * ulp * expected.abs().max()
    assert (result.float() - plain).abs().max() > 0.01  # the delta is there
    assert torch.equal(module.weight.detach(), weight)


def test_gpt2_conv1d_and_tied_embedding_probe_equals_the_materialised_direction():
    # GPT-2's attention and MLP use Conv1D (weight stored (in, out)); its output head is tied to the
    # token embedding, so the same low-rank Z must reach both the gather and the head's product.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    space = lowrank_space(model)
    prober = Prober(model, space, "hooks")
    assert any(type(m).__name__ == "Conv1D" for m, _, added in prober._owners if added)
    before = model_digest(model)
    fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    hooked = prober.evaluate(fn, 5, 0.02)
    swapped = Prober(model, space, "swap").evaluate(fn, 5, 0.02)
    assert model_digest(model) == before
    assert hooked == pytest.approx(swapped, rel=1e-5)
    with torch.no_grad():
        assert abs(hooked - float(fn())) > 1e-4


def test_factor_streams_give_each_matrix_its_own_factors_whatever_was_drawn_before():
    # A direction's factors are one stream cut into per-matrix views: distinct matrices get distinct
    # numbers, and the values do not depend on which directions were drawn (or kept) before.
    fresh, busy = lowrank_space(TinyLM()), lowrank_space(TinyLM())
    for k in range(20):
        busy.factors(mix_seed(1, k), 1)
    busy.factor_streams.prefetch([mix_seed(2, k) for k in range(5)], None)
    for index in (0, 1, 3):  # the embedding, fc1 and fc2 weights
        u, v = fresh.factors(77, index)
        assert torch.equal(u, busy.factors(77, index)[0]) and torch.equal(v, busy.factors(77, index)[1])
    assert not torch.equal(fresh.factors(77, 1)[0][:4], fresh.factors(77, 3)[0][:4])


def test_factor_streams_are_trimmed_after_an_update_and_lazy_v_survives_window_changes():
    from ray_s2p.zo.factors import KEEP
    model, reference = TinyLM(), TinyLM()
    space, ref_space = lowrank_space(model, interval=2), lowrank_space(reference, interval=2)
    pairs = [(mix_seed(8, j), 0.01 * (-1) ** j) for j in range(KEEP + 12)]
    space.factors(pairs[0][0], 1, 1)  # a probe of step 1 (window 0) ...
    space.factors(mix_seed(9, 9), 1, 5)  # ... then one of step 5 (window 2) drops window 0's V
    apply_update(space, pairs[:1], step=1)  # the update of step 1 still finds its V (its stream was kept)
    apply_update(space, pairs[1:], step=1)
    assert len(space.factor_streams._streams) <= KEEP  # the update's streams are not kept
    with torch.no_grad():
        for i, p in enumerate(ref_space.params):
            for seed, c in pairs:
                p.add_(ref_space.noise(seed, i, 1), alpha=c)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
