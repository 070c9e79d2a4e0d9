"""Half-precision weights: seeded stochastic rounding, exact probes and replay of bf16/fp16 runs."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from conftest import TinyLM
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.digest import model_digest
from ray_s2p.zo import noise, rounding
from ray_s2p.zo.directions import DirectionSpace, NoiseTable
from ray_s2p.zo.lowrank import add_lowrank
from ray_s2p.zo.noise import mix_seed
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config
from ray_s2p.zo.probes import Prober
from ray_s2p.zo.rounding import stochastic_round
from ray_s2p.zo.space import select_parameters
from ray_s2p.zo.update import apply_update

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


# The bf16 rounding's bits are part of every recorded bf16 trajectory: these digests were taken with the first
# implementation (int16 words masked to 16 bits, isnan + any as the NaN screen) and must never change.
BF16_ROUNDING_PINS = {"with_nan": "4b79566496649ed863eaffb43ad8223816b7e16747d94d8e8485ca8ce3481ef2",
                      "finite": "b3815794c6a20ed3d5204192f8960baaa84ec6bad0971e4681fb49f7acd33fe1"}


@pytest.mark.parametrize("case", sorted(BF16_ROUNDING_PINS))
def test_bf16_rounding_bits_are_pinned(case):
    x = torch.randn(100_003, generator=gen(7)) * torch.logspace(-6, 4, 100_003)  # odd size: a partial word
    x[::997] = float("nan") if case == "with_nan" else 1.0
    x[5], x[6], x[7], x[8] = float("inf"), -float("inf"), 0.0, -0.0
    x[9] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # a NaN whose pattern would wrap
    if case == "finite":
        x[9] = 2.0
    out = stochastic_round(x, torch.bfloat16, gen(11))
    assert hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest() == BF16_ROUNDING_PINS[case]
    assert torch.isnan(out).sum() == torch.isnan(x).sum()  # NaN in, NaN out, nothing else


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


# ---------------------------------------------------------------- updates of bf16/fp16 parameters
def wide(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """Two 256-wide layers: enough elements for the update's jobs to run on threads."""
    gen_ = gen(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                                torch.nn.Tanh(), torch.nn.Linear(256, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen_) * 0.1)
    return model.to(dtype)


def space_of(model: torch.nn.Module, distribution: str = "gaussian", threads: int = 1,
             run_seed: int = 3) -> DirectionSpace:
    names, params = select_parameters(model)
    table = NoiseTable(1 << 17) if distribution == "table" else None
    return DirectionSpace(names, params, distribution, table, threads=threads, run_seed=run_seed)


PAIRS = [(mix_seed(9, j), c) for j, c in enumerate([2e-3, -1e-3, 5e-4])]


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("distribution", ["gaussian", "lowrank", "table"])
def test_half_update_is_the_same_for_any_thread_count_and_on_every_replica(distribution, chunk, monkeypatch):
    if chunk is not None:  # several chunks per weight, each with its own rounding generator, on 2 threads
        monkeypatch.setattr(noise, "CHUNK", chunk)
    digests = []
    for threads in (1, 2, 2):  # the last two: two replicas with the same settings
        model = wide(0, torch.bfloat16)
        before = model_digest(model)
        space = space_of(model, distribution, threads)
        for step in (1, 2, 3):
            apply_update(space, PAIRS, param_scale=0.999, step=step)
        assert all(p.dtype == torch.bfloat16 and p.requires_grad and p.grad_fn is None for p in space.params)
        assert model_digest(model) != before
        digests.append(model_digest(model))
    assert digests[0] == digests[1] == digests[2]
    other_run = wide(0, torch.bfloat16)
    space = space_of(other_run, distribution, 2, run_seed=4)
    for step in (1, 2, 3):
        apply_update(space, PAIRS, param_scale=0.999, step=step)
    assert model_digest(other_run) != digests[0]  # the rounding is seeded by the run seed


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("block", [1 << 17, 20])
def test_half_update_equals_one_stochastic_rounding_of_the_float32_sum_per_chunk(dtype, block, monkeypatch):
    # A chunked parameter: every chunk of 64 elements is x * s + c1 z1 + c2 z2 in float32, rounded once
    # with the generator of (run seed, step, parameter, chunk). A low-rank matrix: the whole tensor with
    # chunk 0, whether it is made in one block of rows or in blocks of 2 rows (block=20 elements, 9 columns).
    monkeypatch.setattr(noise, "CHUNK", 64)
    monkeypatch.setattr(rounding, "BLOCK_NUMEL", block)
    weight = torch.nn.Parameter((torch.randn(10, 20, generator=gen(1)) * 0.5).to(dtype))  # chunks 64, 64, 64, 8
    start = weight.detach().clone()
    space = DirectionSpace(["w"], [weight], "gaussian", run_seed=5)
    pairs, scale, step = [(11, 0.003), (12, -0.002)], 0.99, 7
    apply_update(space, pairs, param_scale=scale, step=step)
    x32 = start.float().reshape(-1)
    expected = []
    for k, (lo, hi) in enumerate(noise.chunk_bounds(200)):
        acc = x32[lo:hi] * scale
        for s, c in pairs:
            acc.add_(space.noise(s, 0).reshape(-1)[lo:hi], alpha=c)
        expected.append(stochastic_round(acc, dtype, gen(mix_seed(5, step, 0, k))))
    assert torch.equal(weight.detach().reshape(-1).view(torch.int16), torch.cat(expected).view(torch.int16))

    matrix = torch.nn.Parameter((torch.randn(12, 9, generator=gen(2)) * 0.5).to(dtype))
    start = matrix.detach().clone()
    space = DirectionSpace(["m"], [matrix], "lowrank", run_seed=5)
    apply_update(space, pairs, param_scale=scale, step=step)
    acc = start.float() * scale
    add_lowrank(acc, [(c, *space.factors(s, 0, step)) for s, c in pairs])  # all directions in one product
    rounded = stochastic_round(acc, dtype, gen(mix_seed(5, step, 0, 0)))
    assert torch.equal(matrix.detach().view(torch.int16), rounded.view(torch.int16))
    torch.testing.assert_close(acc, start.float() * scale + sum(c * space.noise(s, 0) for s, c in pairs))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("block", [1, 7, 64, 1 << 17])
def test_rounding_rows_block_by_block_gives_the_bits_of_the_whole(dtype, block, monkeypatch):
    monkeypatch.setattr(rounding, "BLOCK_NUMEL", block)
    x = torch.randn(37, 11, generator=gen(4)) * torch.logspace(-4, 3, 11)  # 407 elements: a partial last word
    x[3, 4], x[20, 0], x[30, 10] = float("nan"), float("inf"), -float("inf")
    whole = stochastic_round(x, dtype, gen(21))
    out = torch.zeros(37, 11, dtype=dtype)
    made = []

    def rows(lo: int, hi: int) -> torch.Tensor:
        made.append((lo, hi))
        return x[lo:hi].clone()
    rounding.round_rows_into(out, rows, gen(21))
    assert torch.equal(out.view(torch.int16), whole.view(torch.int16))
    if dtype == torch.bfloat16:  # every row once, in order, in blocks of about ``block`` elements
        step = max(1, block // 11)
        assert made == [(lo, min(37, lo + step)) for lo in range(0, 37, step)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("chunk", [64, 1 << 18])
def test_half_probe_is_the_float32_sum_rounded_to_nearest_in_the_parameters_dtype(dtype, chunk, monkeypatch):
    # x + rho z is formed in float32 one chunk at a time and rounded to nearest into a half-precision
    # output: the same bits as rounding the whole float32 sum, with no float32 copy of the tensor.
    monkeypatch.setattr(noise, "CHUNK", chunk)
    weight = torch.nn.Parameter((torch.randn(30, 20, generator=gen(3)) * 0.5).to(dtype))  # 600: 10 chunks of 64
    start = weight.detach().clone()
    space = DirectionSpace(["w"], [weight], "gaussian", run_seed=5)
    out = space.perturbed(17, 0, 1e-2)
    expected = (start.float() + 1e-2 * space.noise(17, 0)).to(dtype)
    assert out.dtype == dtype and torch.equal(out.view(torch.int16), expected.view(torch.int16))
    assert not torch.equal(out, start) and torch.equal(weight.detach(), start)  # moved; the weight itself not


def test_float32_update_keeps_its_in_place_arithmetic():
    # fp32 parameters take no detour through rounding: x *= s, then x += c z per direction, in place.
    model = wide(0, torch.float32)
    space = space_of(model)
    expected = [p.detach().clone() for p in space.params]
    for i, e in enumerate(expected):
        e.mul_(0.999)
        for s, c in PAIRS:
            e.add_(space.noise(s, i), alpha=c)
    apply_update(space, PAIRS, param_scale=0.999)  # no step needed for fp32
    assert all(torch.equal(p.detach(), e) for p, e in zip(space.params, expected))


def test_half_update_without_the_step_is_refused():
    space = space_of(wide(0, torch.bfloat16))
    with pytest.raises(ValueError, match="stochastic rounding.*needs the step"):
        apply_update(space, PAIRS)
    apply_update(space, [(1, 0.0)])  # nothing to update: no step needed


# ---------------------------------------------------------------- probes
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mechanism", ["hooks", "swap"])
@pytest.mark.parametrize("distribution", ["gaussian", "lowrank"])
def test_probes_leave_half_weights_bitwise_intact(dtype, mechanism, distribution):
    model = TinyLM().to(dtype)
    ids = torch.randint(0, 50, (8, 5), generator=gen(1))
    fn = lambda: model(ids).pow(2).mean()  # noqa: E731
    space = space_of(model, distribution)
    before = model_digest(model)
    with torch.no_grad():
        plain = float(fn())
    prober = Prober(model, space, mechanism)
    losses = [prober.evaluate(fn, mix_seed(0, k), r, k + 1) for k in range(20) for r in (0.05, -0.05)]
    assert model_digest(model) == before
    assert all(p.dtype == dtype for p in model.parameters())
    assert sum(loss != plain for loss in losses) >= 30  # the probes did perturb the forward


# ---------------------------------------------------------------- the plain PyTorch optimizer
@pytest.mark.parametrize("dtype", HALF)
def test_plain_optimizer_trains_a_half_model_in_its_dtype(dtype):
    # MeZO on a small regression: 200 steps take the loss from about 16 to below a tenth of it
    # (measured 0.7 in bf16 and fp16, as in fp32), with the parameters in `dtype` throughout.
    g = gen(0)
    x = torch.randn(128, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(p.numel())) * 0.3)
    model.to(dtype)
    fn = lambda: torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)  # noqa: E731
    opt = ZerothOrderOptimizer(model, optimizer_config(name="mezo", lr=0.02, rho=1e-2), seed=0, total_steps=200)
    with torch.no_grad():
        start = float(fn())
    for _ in range(200):
        opt.step(fn)
    with torch.no_grad():
        end = float(fn())
    assert all(p.dtype == dtype for p in model.parameters())
    assert start > 10 and end < 0.1 * start, (start, end)


# ---------------------------------------------------------------- runs
def half_run(tmp_path, name: str, weights: str, **overrides):
    from conftest import smoke_dict
    from ray_s2p.distributed.driver import train

    cfg = RunConfig.from_dict(smoke_dict(**{"precision.weights": weights, "cluster.digest_every": 1, **overrides}))
    return cfg, train(cfg, tmp_path / name, log=lambda m: None)


@pytest.mark.parametrize("weights", ["bf16", "fp16"])
def test_half_precision_run_repeats_and_replays_bit_for_bit(tmp_path, weights, capsys):
    from safetensors.torch import load_file

    from ray_s2p.cli import main as cli_main

    _, a = half_run(tmp_path, "a", weights)
    _, b = half_run(tmp_path, "b", weights)
    _, fp32 = half_run(tmp_path, "fp32", "fp32")
    assert a.final_digest == b.final_digest != fp32.final_digest
    assert a.summary["replica_resyncs"] == 0  # both replicas had equal digests at every step
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[weights]
    assert {t.dtype for t in load_file(str(tmp_path / "a" / "final" / "model.safetensors")).values()} == {dtype}
    assert a.summary["final_metrics"]["eval_loss"] < 0.8 * a.summary["initial_metrics"]["eval_loss"]
    capsys.readouterr()
    assert cli_main(["replay", str(tmp_path / "a"), "--check"]) == 0  # what `ray-s2p replay RUN --check` runs
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["match"] is True


def test_half_precision_resume_continues_to_the_same_digest(tmp_path):
    import yaml

    from ray_s2p.distributed.driver import train

    cfg, full = half_run(tmp_path, "full", "bf16")
    half_run(tmp_path, "part", "bf16", steps=20)  # as if the driver had died after step 20
    (tmp_path / "part" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda m: None)
    assert resumed.final_digest == full.final_digest
