"""Counter-based noise (``perturbation.noise: philox``) through the direction space, the update and the trainer:
the CPU path is the plain Philox reference bit for bit; the kernel path (Triton's interpreter here, the GPU's
code path) gives the same bits; training keeps replicas identical, learns and replays exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.distributed.checkpoint import config_fingerprint
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.replay import replay_run
from ray_s2p.zo import counter_noise
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.lowrank import lowrank_sum
from ray_s2p.zo.noise import CHUNK, mix_seed
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config
from ray_s2p.zo.philox import perturbed_reference, randn, updated_reference
from ray_s2p.zo.update import apply_update

RUN_SEED = 11


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(view),
                                                                     b.contiguous().view(view))


def params(dtype: torch.dtype, big: int = CHUNK + 1000) -> list[torch.nn.Parameter]:
    """A matrix bigger than one CPU slice (so the slicing is exercised), a bias, and a transposed (non-contiguous)
    matrix."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(big // 10, 10), (10,), (7, 5)]
    out = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]
    out[2] = torch.nn.Parameter(out[2].detach().t())  # non-contiguous
    assert not out[2].is_contiguous()
    return out


def space_of(ps: list[torch.nn.Parameter], threads: int = 2, decay_exempt: tuple[bool, ...] = (),
             distribution: str = "gaussian") -> DirectionSpace:
    return DirectionSpace([f"p{i}" for i in range(len(ps))], ps, distribution, threads=threads, run_seed=RUN_SEED,
                          noise_source="philox", decay_exempt=decay_exempt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_copies_are_the_reference_and_leave_the_weights_intact(dtype):
    ps = params(dtype)
    space = space_of(ps)
    before = [p.detach().clone() for p in ps]
    seed, radius = 1234, 1e-3
    copies = space.perturbed_many(seed, [0, 1, 2], radius)
    for i, (p, copy) in enumerate(zip(ps, copies)):
        assert same_bits(copy, perturbed_reference(p, mix_seed(seed, i), radius))
        assert same_bits(p.detach(), before[i])
        assert not torch.equal(copy, p.detach())
    # The bare noise is randn(key, element index), whatever the thread count.
    assert torch.equal(space.noise(seed, 1), randn(mix_seed(seed, 1), torch.arange(10)))
    assert same_bits(space_of(params(dtype), threads=1).perturbed_many(seed, [0], radius)[0], copies[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign_step", [None, 0.01])
def test_update_is_the_reference_with_decay_exemptions_signs_and_seeded_rounding(dtype, sign_step):
    ps = params(dtype)
    space = space_of(ps, decay_exempt=(False, True, False))
    before = [p.detach().clone() for p in ps]
    pairs, step = [(5, 0.3), (6, -0.2), (7, 0.0)], 9
    apply_update(space, pairs, param_scale=0.99, step=step, sign_step=sign_step)
    for i, p in enumerate(ps):
        expected = updated_reference(before[i], [(mix_seed(s, i), c) for s, c in pairs if c != 0.0],
                                     1.0 if i == 1 else 0.99, sign_step, mix_seed(RUN_SEED, step, i))
        assert same_bits(p.detach(), expected)
    assert not same_bits(ps[0].detach(), before[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign_step", [None, 0.01])
def test_lowrank_update_is_its_product_through_the_one_pass_update(dtype, sign_step):
    """Low-rank matrices and factor-stream vectors keep their noise; the product (or the stream's sum) is the
    delta of the same one-pass update and rounding as Gaussian parameters."""
    ps = params(dtype)
    space = space_of(ps, distribution="lowrank")
    before = [p.detach().clone() for p in ps]
    pairs, step = [(5, 0.3), (6, -0.2)], 4
    streams = space.factor_streams
    streams.prefetch([s for s, _ in pairs], step)
    _, w_sum = streams.combined(pairs, step)
    deltas = [lowrank_sum([(c, *space.factors(s, 0, step)) for s, c in pairs]),
              streams.slice_w(w_sum, 1, torch.device("cpu")),
              lowrank_sum([(c, *space.factors(s, 2, step)) for s, c in pairs])]
    apply_update(space, pairs, param_scale=0.99, step=step, sign_step=sign_step)
    for i, p in enumerate(ps):
        expected = updated_reference(before[i], [], 0.99, sign_step, mix_seed(RUN_SEED, step, i), delta=deltas[i])
        assert same_bits(p.detach(), expected)
        assert not same_bits(p.detach(), before[i])
    # Probes: a low-rank matrix's copy is x + radius U V^T / sqrt(r), as with generator noise.
    generator = DirectionSpace(["a", "b", "c"], [torch.nn.Parameter(b.clone()) for b in before], "lowrank",
                               run_seed=RUN_SEED)
    for i in range(3):
        assert same_bits(space_of([torch.nn.Parameter(b.clone()) for b in before], distribution="lowrank")
                         .perturbed(9, i, 1e-2, step=step), generator.perturbed(9, i, 1e-2, step=step))


def test_bf16_update_needs_the_step_and_unsupported_dtypes_are_refused():
    space = space_of(params(torch.bfloat16, big=100))
    with pytest.raises(ValueError, match="needs the step of the update"):
        apply_update(space, [(1, 0.1)])
    with pytest.raises(ValueError, match="handles float32 and bfloat16 weights, not torch.float16"):
        space_of(params(torch.float16, big=100))
    with pytest.raises(ValueError, match="makes Gaussian and low-rank directions, not rademacher"):
        DirectionSpace(["w"], params(torch.float32, big=100)[:1], "rademacher", noise_source="philox")


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank"])
def test_the_kernel_path_gives_the_reference_bits(monkeypatch, distribution):
    """What runs on a GPU (one fused kernel per weight, here in Triton's interpreter) against the CPU path."""
    pytest.importorskip("triton", reason="triton is not installed (it comes with the test and gpu extras on Linux "
                                         "x86_64 only)")
    results = {}
    for path in ("reference", "triton"):
        monkeypatch.setattr(counter_noise, "backend", lambda device, path=path: path)
        for dtype in (torch.float32, torch.bfloat16):
            ps = params(dtype, big=2000)
            space = space_of(ps, distribution=distribution)
            copies = space.perturbed_many(77, [0, 1, 2], -2e-3)
            noise = space.noise(77, 2)
            apply_update(space, [(77, 0.5), (78, -0.25)], param_scale=0.995, step=3)
            results[path, dtype] = (copies, noise, [p.detach().clone() for p in ps])
    for dtype in (torch.float32, torch.bfloat16):
        (c_ref, n_ref, w_ref), (c_ker, n_ker, w_ker) = results["reference", dtype], results["triton", dtype]
        assert all(same_bits(a, b) for a, b in zip(c_ref, c_ker))
        assert same_bits(n_ref, n_ker)
        assert all(same_bits(a, b) for a, b in zip(w_ref, w_ker))


def test_the_plain_optimizer_learns_with_philox_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    model = torch.nn.Linear(8, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = ZerothOrderOptimizer(model, optimizer_config(name="mezo", lr=0.01, rho=1e-3), seed=0, noise="philox")
    loss = lambda: torch.nn.functional.mse_loss(model(x), y).detach()  # noqa: E731
    first = float(loss())
    for _ in range(200):
        opt.step(loss)
    assert float(loss()) < 0.01 * first  # 9.88 -> 0.011 measured


def test_config_refuses_philox_with_other_distributions_and_fp16_weights():
    with pytest.raises(ConfigError, match="perturbation.noise.*philox makes Gaussian and low-rank directions, not "
                                          "table"):
        RunConfig.from_dict(smoke_dict(**{"perturbation.noise": "philox", "perturbation.distribution": "table"}))
    with pytest.raises(ConfigError, match="perturbation.noise.*not precision.weights fp16"):
        RunConfig.from_dict(smoke_dict(**{"perturbation.noise": "philox", "precision.weights": "fp16"}))
    with pytest.raises(ConfigError, match="perturbation.noise.*use generator or philox"):
        RunConfig.from_dict(smoke_dict(**{"perturbation.noise": "curand"}))


def test_fingerprints_keep_generator_runs_and_separate_philox_ones():
    plain = RunConfig.from_dict(smoke_dict()).to_dict()
    without_key = {**plain, "perturbation": {k: v for k, v in plain["perturbation"].items() if k != "noise"}}
    assert config_fingerprint(plain) == config_fingerprint(without_key)
    philox = RunConfig.from_dict(smoke_dict(**{"perturbation.noise": "philox"})).to_dict()
    assert config_fingerprint(philox) != config_fingerprint(plain)


@pytest.mark.parametrize("weights,distribution", [("fp32", "gaussian"), ("bf16", "gaussian"), ("bf16", "lowrank")])
def test_a_philox_run_keeps_replicas_identical_learns_and_replays_bit_for_bit(tmp_path, weights, distribution):
    cfg = RunConfig.from_dict(smoke_dict(**{"perturbation.noise": "philox", "precision.weights": weights,
                                            "perturbation.distribution": distribution, "cluster.digest_every": 1}))
    result = train(cfg, tmp_path / "run", log=lambda m: None)
    s = result.summary
    assert s["replica_resyncs"] == 0
    assert s["final_metrics"]["eval_loss"] < 0.8 * s["initial_metrics"]["eval_loss"]
    assert s["environment"]["noise"] == f"philox/reference numpy {np.__version__}"
    assert replay_run(tmp_path / "run").digest == result.final_digest
    generator = train(RunConfig.from_dict(smoke_dict(**{"precision.weights": weights,
                                                        "perturbation.distribution": distribution})),
                      tmp_path / "gen", log=lambda m: None)
    assert generator.final_digest != result.final_digest  # another noise, another trajectory
    assert generator.summary["environment"]["noise"] == "generator"
