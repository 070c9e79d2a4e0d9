"""The fused noise kernels (zo/kernels.py) in Triton's interpreter against their plain references
(zo/philox.py), bit for bit: probes leave the weight intact, updates with every option, bf16 rounding.
tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton."""

from __future__ import annotations

import pytest
import torch

from ray_s2p.zo.philox import perturbed_reference, updated_reference

pytest.importorskip("triton", reason="triton is not installed (it comes with the test and gpu extras on Linux x86_64 "
                                     "only)")
from ray_s2p.zo import kernels  # noqa: E402

KEYS = [0x0123_4567_89AB_CDEF & ((1 << 63) - 1), 42, (1 << 62) + 5]
SIZE = 3 * kernels.BLOCK + 17  # several blocks and a ragged end


def weights(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(SIZE, generator=gen) * 0.05).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_is_the_reference_and_leaves_the_weight_intact(dtype):
    x = weights(dtype)
    before = x.clone()
    out = kernels.perturb(x, KEYS[0], 1e-3)
    assert same_bits(out, perturbed_reference(x, KEYS[0], 1e-3))
    assert same_bits(x, before)
    assert not same_bits(out, x)  # it did move


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_scale, sign_step", [(1.0, None), (0.999, None), (1.0, 1e-3), (0.99, 1e-3)])
def test_update_is_the_reference(dtype, param_scale, sign_step):
    pairs = [(KEYS[0], 0.02), (KEYS[1], -0.5), (KEYS[2], 1e-4)]
    x = weights(dtype, 1)
    expected = updated_reference(x, pairs, param_scale, sign_step, rounding_key=7)
    kernels.update(x, pairs, param_scale, sign_step, rounding_key=7)
    assert same_bits(x, expected)


def test_bf16_updates_far_below_half_an_ulp_survive_in_expectation():
    # 1.0 in bf16 has an ulp of 2**-7: an update of 2**-12 is 1/32 of it. Round to nearest would keep 1.0
    # everywhere; the stochastic rounding moves about 1/32 of the elements up one ulp.
    x = torch.ones(16 * kernels.BLOCK, dtype=torch.bfloat16)
    key = KEYS[1]
    z = updated_reference(torch.zeros(x.numel()), [(key, 1.0)])
    pairs = [(key, 2.0**-12 / float(z.abs().mean()))]  # coefficient so that the mean |update| is 2**-12
    kernels.update(x, pairs, rounding_key=3)
    moved = (x.float() - 1.0)
    mean_update = float((z * pairs[0][1]).mean())
    assert abs(float(moved.mean()) - mean_update) < 4e-4  # unbiased within sampling error (16 k elements)
    assert float((moved != 0).float().mean()) > 0.02
    assert same_bits(x, updated_reference(torch.ones_like(x), pairs, rounding_key=3))


def test_other_weight_dtypes_are_refused_by_name():
    with pytest.raises(kernels.KernelUnavailable, match="float32 and bfloat16 weights, not torch.float16"):
        kernels.perturb(torch.zeros(4, dtype=torch.float16), 1, 0.1)
