"""Half-precision weights: seeded stochastic rounding, exact probes and replay of bf16/fp16 runs."""

from __future__ import annotations

import math

import pytest
import torch

from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.zo.noise import mix_seed
from ray_s2p.zo.rounding import stochastic_round

HALF = [torch.bfloat16, torch.float16]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ulp_at_one(dtype: torch.dtype) -> float:
    return 2.0 ** -MANTISSA_BITS[dtype]


# ---------------------------------------------------------------- the rounding itself
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("base,fraction", [(1.0, 0.3), (-3.0, 0.85), (1.0, 0.01)])
def test_rounding_is_unbiased_and_lands_on_the_two_neighbours(dtype, base, fraction):
    # x lies `fraction` of an ulp above `base` (a representable number): over 200 seeds x 256 copies
    # the mean must be x within 5 standard errors of a two-point variable, and only base and its
    # upper neighbour may appear, the upper one with frequency `fraction`.
    ulp = ulp_at_one(dtype) * 2.0 ** math.floor(math.log2(abs(base)))
    x = torch.full((256,), base + fraction * ulp, dtype=torch.float32)
    samples = torch.cat([stochastic_round(x, dtype, gen(mix_seed(11, k))) for k in range(200)]).double()
    n = samples.numel()
    assert set(samples.unique().tolist()) == {base, base + ulp}
    stderr = ulp * math.sqrt(fraction * (1 - fraction) / n)
    assert abs(float(samples.mean()) - float(x[0])) < 5 * stderr
    assert abs(float((samples == base + ulp).double().mean()) - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n)


@pytest.mark.parametrize("dtype", HALF)
def test_every_result_is_a_neighbour_of_its_input(dtype):
    # Inputs over 40 binades, fp16's subnormals included: each result is x itself or one of the two
    # representable numbers around x (the step from the result toward x crosses or reaches x).
    g = gen(5)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 10, (20000,), generator=g).float())
    if dtype == torch.float16:
        x = x.clamp(-65504, 65504)
    y = stochastic_round(x, dtype, gen(6))
    assert y.dtype == dtype and y.shape == x.shape
    y32 = y.float()
    toward = torch.where(y32 < x, torch.tensor(float("inf")), torch.tensor(float("-inf"))).to(dtype)
    step_toward = torch.nextafter(y, toward).float()
    assert bool(((y32 == x) | ((y32 - x) * (step_toward - x) <= 0)).all())
    assert not torch.equal(y, x.to(dtype))  # not round-to-nearest in disguise


@pytest.mark.parametrize("dtype", HALF)
def test_representable_values_and_non_finite_values_pass_through(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.125, 1024.0, float("inf"), float("-inf"), float("nan")])
    for seed in range(20):
        y = stochastic_round(exact, dtype, gen(seed))
        assert torch.equal(y[:-1], exact[:-1].to(dtype)) and bool(torch.isnan(y[-1]))
        assert math.copysign(1.0, float(y[1])) == -1.0  # -0.0 keeps its sign
    if dtype == torch.float16:  # beyond the largest finite fp16 the cast's value (nearest) is kept
        big = torch.tensor([65510.0, 70000.0, -1e6])
        assert torch.equal(stochastic_round(big, dtype, gen(0)), big.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_same_generator_seed_same_bits(dtype):
    x = torch.randn(10000, generator=gen(1))
    a, b = (stochastic_round(x, dtype, gen(42)) for _ in range(2))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    c = stochastic_round(x, dtype, gen(43))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert torch.equal(x, torch.randn(10000, generator=gen(1)))  # the input is not modified


def test_wrong_input_or_target_dtype_is_refused():
    with pytest.raises(ValueError, match="float32"):
        stochastic_round(torch.zeros(3, dtype=torch.float64), torch.bfloat16, gen(0))
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        stochastic_round(torch.zeros(3), torch.float32, gen(0))


@pytest.mark.parametrize("dtype", HALF)
def test_updates_far_below_half_an_ulp_survive_only_with_stochastic_rounding(dtype):
    # 4096 weights at 1.0 get 200 updates of +1e-4 each; the ulp above 1.0 is 2^-7 (bf16) or 2^-10
    # (fp16), so half an ulp is 39x (bf16) or 4.9x (fp16) the update.
    steps, delta, n = 200, 1e-4, 4096
    nearest = torch.ones(n, dtype=dtype)
    stochastic = torch.ones(n, dtype=dtype)
    for k in range(1, steps + 1):
        nearest.add_(delta)  # round to nearest, what a plain bf16/fp16 update does
        stochastic = stochastic_round(stochastic.float() + delta, dtype, gen(mix_seed(0, k)))
    assert torch.equal(nearest, torch.ones(n, dtype=dtype)), "round to nearest loses every update"
    # Each step the weight (on the grid, in [1, 2)) moves up one ulp with probability q = (1 + delta in
    # float32 - 1) / ulp, so after 200 steps it is 1 + ulp * Binomial(200, q): mean 1 + 200 q ulp, and
    # the mean of n weights has standard error ulp sqrt(200 q (1 - q) / n).
    ulp = ulp_at_one(dtype)
    q = (float(torch.tensor(1.0) + delta) - 1.0) / ulp
    expected = 1.0 + steps * q * ulp
    stderr = ulp * math.sqrt(steps * q * (1 - q) / n)
    mean = float(stochastic.double().mean())
    assert abs(mean - expected) < 5 * stderr, (mean, expected, stderr)
    assert abs(mean - (1.0 + steps * delta)) < 0.001  # about 0.02 moved, as 200 exact updates would


# ---------------------------------------------------------------- config
def test_precision_weights_is_validated_and_names_the_field():
    assert RunConfig().precision.weights == "fp32"
    for value in ("fp32", "bf16", "fp16"):
        cfg = RunConfig.from_dict({"precision": {"weights": value}})
        assert cfg.precision.weights == value and RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig().replace({"precision.weights": "bf16"}).precision.weights == "bf16"
    with pytest.raises(ConfigError, match=r"'precision\.weights'.*Fix: use fp32, bf16 or fp16"):
        RunConfig.from_dict({"precision": {"weights": "fp8"}})
    with pytest.raises(ConfigError, match=r"'precision\.master'"):
        RunConfig.from_dict({"precision": {"master": "fp32"}})


def test_precision_enters_the_fingerprint_only_for_half_weights():
    from conftest import smoke_dict
    from ray_s2p.distributed.checkpoint import config_fingerprint

    fp32 = RunConfig.from_dict(smoke_dict()).to_dict()
    before_precision = {k: v for k, v in fp32.items() if k != "precision"}
    assert config_fingerprint(fp32) == config_fingerprint(before_precision)  # older runs still resume
    half = [RunConfig.from_dict(smoke_dict(**{"precision.weights": w})).to_dict() for w in ("bf16", "fp16")]
    assert len({config_fingerprint(fp32), *(config_fingerprint(h) for h in half)}) == 3
