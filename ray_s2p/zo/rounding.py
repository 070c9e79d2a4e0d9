"""Seeded stochastic rounding of float32 results to bf16 and fp16 weights.

Why: a bf16 weight near 1.0 has an ulp of 2^-7 (about 0.008). A zeroth-order
update is often far smaller than half of that, and round-to-nearest then gives
the old weight back: the step is lost, every step, however many there are.
Stochastic rounding picks one of the two neighbours ``lo <= x <= hi`` with
P(hi) = (x - lo) / (hi - lo), so E[round(x)] = x: small updates survive in
expectation and accumulate over steps.

The random numbers come from a ``torch.Generator`` the caller seeds (the update
seeds it from run seed, step, parameter and chunk), so the rounding is a pure
function of its inputs: every replica and every replay of a ledger rounds the
same element the same way.

- bf16 (the upper 16 bits of a float32): add a uniform random integer in
  [0, 2^16) to the float32's bit pattern and clear the low 16 bits. The carry
  into bit 16 happens with probability (low 16 bits) / 2^16 = (x - lo) / ulp,
  and the cast of the result to bf16 is exact. Sign-magnitude bit patterns make
  this work for negative numbers too (the magnitude is rounded), and bf16 has
  float32's exponent range, so subnormals need no special case.
- fp16 (10 mantissa bits, exponents down to 2^-24 with subnormals, largest
  finite 65504): the nearest fp16 and its neighbour on the other side of x
  (``torch.nextafter``) give lo and hi; the upper one is taken when a uniform
  float32 u in [0, 1) is below (x - lo) / (hi - lo).

NaN and +-inf pass through unchanged.

``round_rows_into`` rounds a matrix whose float32 values are made a block of rows at
a time (a low-rank update, zo/update.py): every block's passes stay in cache, and
the bits are those of ``stochastic_round`` over the whole matrix (the generator's
words are drawn once, in the same order).
"""

from __future__ import annotations

from typing import Callable

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
_HIGH16 = -(1 << 16)  # 0xFFFF0000 as an int32: keeps the bits a bf16 holds
BLOCK_NUMEL = 1 << 17  # elements per block of round_rows_into: 512 kB of float32, in a core's L2 with its bits


def random_uint16(numel: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``numel`` uniform integers in [0, 2^16) as int32: one 64-bit draw of ``gen`` gives four.

    A CPU generator call costs about the same per word whatever the word's width, so
    cutting each int64 into four 16-bit values makes a quarter of the calls.
    """
    # Read as unsigned 16-bit values, each widens straight to [0, 2^16): one pass, no mask.
    return _words16(numel, gen, device).to(torch.int32)


def _words16(numel: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # The generator's int64 words, each cut into four uint16 values (the same draws for any later slicing).
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 3) // 4,), generator=gen, device=device,
                          dtype=torch.int64)
    return words.view(torch.uint16)[:numel]


def stochastic_round(x32: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Round a float32 tensor to ``dtype`` stochastically and unbiasedly (E[result] = x32 in range).

    Args:
        x32: float32 values (not modified).
        dtype: torch.bfloat16 or torch.float16.
        gen: the generator of the random draws, on ``x32``'s device; the result is a function
            of ``x32`` and the generator's state.

    Returns:
        A new tensor of ``dtype`` and ``x32``'s shape; each element is one of the two
        representable neighbours of its input (the input itself when representable).
        fp16 inputs beyond the largest finite value (65504) round to nearest, as a cast
        does, since there is no finite upper neighbour to share the probability with.

    Raises:
        ValueError: ``x32`` is not float32, or ``dtype`` is neither bf16 nor fp16.
    """
    if x32.dtype != torch.float32:
        raise ValueError(f"stochastic_round takes float32 input, got {x32.dtype}")
    if dtype == torch.bfloat16:
        return _round_bf16(x32, gen)
    if dtype == torch.float16:
        return _round_fp16(x32, gen)
    raise ValueError(f"stochastic_round rounds to torch.bfloat16 or torch.float16, not {dtype}")


def _round_bf16(x32: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = x32.reshape(-1)
    bits = random_uint16(flat.numel(), gen, flat.device).add_(flat.view(torch.int32))  # in place: no new tensor
    # No int32 overflow for numbers: the largest magnitude pattern, 0x7F800000 (inf), plus 0xFFFF
    # stays below 2^31 and keeps inf's exponent. Only NaN patterns can wrap; they are put back below.
    out = bits.bitwise_and_(_HIGH16).view(torch.float32).to(torch.bfloat16)  # exact: the low bits are 0
    # On an accelerator a check would wait for the device (a host sync per chunk), so there the NaN patterns are
    # put back unconditionally. On a CPU one sum screens for them: any NaN makes the sum NaN (a read-only pass,
    # about a tenth of isnan + any), and only then is the element-wise pass made. Same result either way.
    if flat.device.type != "cpu" or bool(torch.isnan(flat.sum())):
        out = torch.where(torch.isnan(flat), flat.to(torch.bfloat16), out)
    return out.view(x32.shape)


def _round_fp16(x32: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    nearest = x32.to(torch.float16)
    near32 = nearest.to(torch.float32)
    # The neighbour on the other side of x (below it when x is exactly representable: then
    # P(upper) = 1 below and x comes back unchanged).
    up = near32 < x32
    toward = torch.where(up, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    other = torch.nextafter(nearest, toward)
    lo = torch.where(up, nearest, other)
    hi = torch.where(up, other, nearest)
    lo32 = lo.to(torch.float32)
    gap = hi.to(torch.float32) - lo32  # one fp16 ulp: a power of two, exact in float32
    # x - lo is exact in float32 (Sterbenz: lo is within a factor 2 of x, or 0), and dividing by a
    # power of two is exact, so p has all the bits of (x - lo) / ulp.
    p = (x32 - lo32) / gap
    # A float32 from torch.rand is a multiple of 2^-24 (24 random bits on a CPU): P(u < p) = p exactly
    # when p is a multiple of 2^-24, which holds for every |x| >= 2^-25 (p has at most 13 bits in fp16's
    # normal range). Below that, under half fp16's smallest subnormal, P(hi) is off by less than 2^-24.
    u = torch.rand(x32.shape, generator=gen, device=x32.device, dtype=torch.float32)
    out = torch.where(u < p, hi, lo)
    # Beyond 65504 one neighbour is inf (gap = inf), and for NaN or inf input gap is NaN or inf:
    # keep the cast's value there.
    return torch.where(torch.isfinite(gap), out, nearest)


def round_rows_into(out: torch.Tensor, rows: Callable[[int, int], torch.Tensor], gen: torch.Generator) -> None:
    """``out.copy_(stochastic_round(x32, out.dtype, gen))`` for a 2-D float32 ``x32`` made a block of rows at a time.

    ``rows(lo, hi)`` returns x32[lo:hi] as a new float32 tensor (the caller's arithmetic for those rows, which
    must not depend on other rows). For bf16 the random words are drawn once for the whole matrix and each block
    takes its slice, so the result is bit for bit ``stochastic_round`` of the whole (the test pins it); the
    block's float32 values, its bits and its rounding stay in cache instead of making a dozen passes through memory
    (about half the time for a 30522 x 384 embedding on one CPU thread). fp16 takes the whole matrix at once.

    Args:
        out: the bf16/fp16 2-D destination (the parameter), written in place.
        rows: (lo, hi) -> float32 rows lo..hi-1 of the values to round.
        gen: the rounding's generator, as for ``stochastic_round``.
    """
    m, n = out.shape
    if out.dtype != torch.bfloat16:
        out.copy_(stochastic_round(rows(0, m), out.dtype, gen))
        return
    words = _words16(m * n, gen, out.device).view(m, n)  # 2 bytes a weight, widened a block at a time
    step = max(1, BLOCK_NUMEL // max(n, 1))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        x32 = rows(lo, hi)
        block = words[lo:hi].to(torch.int32).add_(x32.view(torch.int32)).bitwise_and_(_HIGH16).view(torch.float32)
        if out.device.type != "cpu" or bool(torch.isnan(x32.sum())):  # as in _round_bf16
            block = torch.where(torch.isnan(x32), x32, block)
        out[lo:hi].copy_(block)  # exact: the low 16 bits are 0 (or a NaN goes to bf16 as a cast takes it)
