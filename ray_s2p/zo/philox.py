"""Counter-based noise: Philox4x32-10 and the normal numbers Triton's ``tl.randn`` makes from it.

A counter-based generator makes element j of a stream as a pure function of (key, j): no generator state, no
dependence on launch grids or thread counts, so the same numbers come out of one fused GPU kernel, of many
small ones, or of this reference. Philox4x32-10 (Salmon, Moraes, Dror and Shaw, SC'11) is what torch's CUDA
generator and Triton's ``tl.rand``/``tl.randn`` use.

This module is the plain-torch reference (integers exact, no overflow: 32-bit products are split into
16-bit halves in int64) and the float transforms as Triton writes them (its language module, random):

- ``randint4x(key, offsets)``: the four 32-bit words of Philox with counter (offset low, offset high, 0, 0)
  and key (key low, key high);
- ``uniform(words)``: a word, read as int32, folded to non-negative (``~x`` for negative x) and times
  4.6566127342e-10 in float32: U[0, 1);
- ``randn(key, offsets)``: Box-Muller on the first two words' uniforms, the cosine branch.

The integer part is exact on every device. Box-Muller's log, sqrt and cosine are float32 library calls
whose last bit differs between libraries (numpy here and in Triton's interpreter, libdevice on a GPU), so
a GPU kernel's normals match this reference to a few ulps, not bit for bit: which implementation made a
run's noise is part of the environment that decides bitwise replay.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
ROUNDS = 10
# Philox4x32's multipliers and Weyl key increments (Random123).
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
UNIFORM_SCALE = np.float32(4.6566127342e-10)  # Triton's: the largest scale with (2**31 - 1) * scale < 1
TWO_PI = np.float32(6.283185307179586)


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high 32 bits, low 32 bits) of a * b for uint32 ``a`` (held in int64) and a uint32 constant ``b``.

    b is split into 16-bit halves so that no intermediate product exceeds 2**48: int64 never overflows.
    """
    low_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (low_part >> 16)  # a * b = mid * 2**16 + (low_part mod 2**16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox4x32(counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int],
               rounds: int = ROUNDS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with ``rounds`` rounds of the four-word ``counter`` (int64 tensors of uint32 values, one
    element per block) under the two-word ``key``; the four output words, as the counter's tensors."""
    c0, c1, c2, c3 = (c.to(torch.int64) & MASK32 for c in counter)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(key: int, offsets: torch.Tensor, rounds: int = ROUNDS
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's ``tl.randint4x(key, offsets)``: Philox of counter (offset low, offset high, 0, 0) under key
    (key low, key high), for a 64-bit ``key`` and non-negative int64 ``offsets``; words as uint32 in int64."""
    offsets = offsets.to(torch.int64)
    zero = torch.zeros_like(offsets)
    return philox4x32((offsets & MASK32, offsets >> 32, zero, zero), (key & MASK32, (key >> 32) & MASK32), rounds)


def uniform(words: torch.Tensor) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` of uint32 ``words``: float32 in [0, 1)."""
    signed = words.to(torch.int64).numpy().astype(np.uint32).view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)
    return folded.astype(np.float32) * UNIFORM_SCALE


def randn(key: int, offsets: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """Triton's ``tl.randn(key, offsets)`` in float32: Box-Muller (cosine branch) on the uniforms of the first
    two Philox words, with numpy's float32 log, sqrt and cosine (those of Triton's interpreter)."""
    w0, w1, _, _ = randint4x(key, offsets, rounds)
    u1 = np.maximum(np.float32(1.0e-7), uniform(w0))
    theta = TWO_PI * uniform(w1)
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    return torch.from_numpy(radius * np.cos(theta))


def _rows(x: torch.Tensor, start: int) -> tuple[np.ndarray, torch.Tensor]:
    flat = x.detach().reshape(-1)
    return flat.to(torch.float32).numpy().copy(), torch.arange(start, start + flat.numel())


def perturbed_reference(x: torch.Tensor, key: int, radius: float, start: int = 0) -> torch.Tensor:
    """What the fused probe kernel (zo/kernels.py ``perturb``) writes: x + radius z in float32, z = ``randn(key,
    element index)``, rounded to nearest into x's dtype; x itself is not touched.

    ``start``: the element index of x's first element, for a slice of a larger tensor (every element's result
    depends only on its own index, so a tensor done in slices gives the same bits as done whole).
    """
    acc, offsets = _rows(x, start)
    acc = acc + np.float32(radius) * randn(key, offsets).numpy()
    return torch.from_numpy(acc).to(x.dtype).view(x.shape)


def updated_reference(x: torch.Tensor, pairs: list[tuple[int, float]], param_scale: float = 1.0,
                      sign_step: float | None = None, rounding_key: int = 0, start: int = 0,
                      delta: torch.Tensor | None = None) -> torch.Tensor:
    """What the fused update kernel (zo/kernels.py ``update``) leaves in x, as a new tensor.

    In float32 per element j: ``acc = x * param_scale``, then for each (key, c) in order ``acc += c z`` (z =
    ``randn(key, j)``), or with ``sign_step = a`` the same sum ``g`` apart and ``acc += -a sign(g)``. A bf16 x
    gets acc rounded stochastically: 16 random bits (the low half of ``randint4x(rounding_key, j)``'s first word)
    added to acc's bit pattern, the low 16 bits cleared (zo/rounding.py explains why that is unbiased); NaN
    rounds to nearest. A float32 x gets acc. ``start`` as in ``perturbed_reference``. ``delta``: an optional
    float32 tensor of x's size added first of the terms (before the pairs; into the sum under the sign).
    """
    acc, offsets = _rows(x, start)
    acc = acc * np.float32(param_scale)
    sink = np.zeros_like(acc) if sign_step is not None else acc
    if delta is not None:
        sink = sink + delta.detach().reshape(-1).to(torch.float32).numpy()
    for key, coefficient in pairs:
        sink = sink + np.float32(coefficient) * randn(key, offsets).numpy()
    if sign_step is not None:
        acc = acc + np.float32(-sign_step) * np.sign(sink).astype(np.float32)
    else:
        acc = sink
    if x.dtype == torch.float32:
        return torch.from_numpy(acc).view(x.shape)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the fused update rounds to float32 or bfloat16 weights, not {x.dtype}")
    words = randint4x(rounding_key, offsets)[0].numpy()
    bits = acc.view(np.int32).astype(np.int64) + (words & 0xFFFF)
    rounded = (bits & 0xFFFF0000).astype(np.uint32).view(np.float32)  # upper 16 bits: exact in bf16
    out = torch.from_numpy(rounded).to(torch.bfloat16)
    nan = torch.from_numpy(np.isnan(acc))
    out = torch.where(nan, torch.from_numpy(acc).to(torch.bfloat16), out)
    return out.view(x.shape)
