"""The Triton kernels behind zo/kernels.py (imported only from there, on first use: it needs triton).

Module-level functions, so that one kernel can call another (Triton resolves them by module name).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["nearest_bf16", "perturb_kernel", "triton", "update_kernel"]


@triton.jit
def nearest_bf16(acc):
    # Round to nearest, ties to even, in integer arithmetic: the same bits on every backend (a cast's
    # rounding mode is the backend's choice, and Triton's interpreter truncates). NaN stays NaN.
    bits = acc.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(acc != acc, acc, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)


@triton.jit
def perturb_kernel(x_ptr, out_ptr, n, key, radius, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out = x + radius z (z = tl.randn(key, element index)), rounded to nearest into out's dtype."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32)
    acc = x + radius * tl.randn(key, index)
    if OUT_BF16:
        tl.store(out_ptr + index, nearest_bf16(acc), mask=mask)
    else:
        tl.store(out_ptr + index, acc, mask=mask)


@triton.jit
def update_kernel(x_ptr, delta_ptr, n, keys_ptr, coefs_ptr, n_pairs, param_scale, sign_step, rounding_key,
                  SIGNED: tl.constexpr, ROUND_BF16: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """x <- param_scale x + delta + sum_i c_i z_i (or - sign_step sign(delta + sum_i c_i z_i)) in float32, then
    into x's dtype (bf16: stochastically, with the random bits of rounding_key at the element's index)."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    acc = tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32) * param_scale
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_DELTA:  # a precomputed float32 sum of directions (a low-rank product), first of the terms
        delta = tl.load(delta_ptr + index, mask=mask, other=0.0)
        if SIGNED:
            g = g + delta
        else:
            acc = acc + delta
    for i in range(n_pairs):
        z = tl.randn(tl.load(keys_ptr + i), index)
        if SIGNED:
            g = g + tl.load(coefs_ptr + i) * z
        else:
            acc = acc + tl.load(coefs_ptr + i) * z
    if SIGNED:
        sign = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))
        acc = acc + (-sign_step) * sign
    if ROUND_BF16:
        word, _, _, _ = tl.randint4x(rounding_key, index)
        bits = acc.to(tl.int32, bitcast=True) + (word & 0xFFFF).to(tl.int32, bitcast=True)
        rounded = (bits & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are 0
        tl.store(x_ptr + index, tl.where(acc != acc, nearest_bf16(acc), rounded), mask=mask)
    else:
        tl.store(x_ptr + index, acc, mask=mask)
