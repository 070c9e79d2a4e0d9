"""Fused counter-based noise kernels (Triton): a probe's perturbed copy and a step's whole update, one pass each.

On an accelerator the eager path makes noise chunk by chunk with generator objects, forms a perturbed bf16
copy in five kernels with two float32 temporaries, and rounds in further passes. Here each weight is read once
and written once:

- ``perturb(x, key, radius, out)``: ``out = x + radius z`` in float32, rounded to nearest into ``out``'s dtype;
  the weight is not touched;
- ``update(x, pairs, ...)``: ``x <- param_scale x + delta + sum_i c_i z_i`` (or the sign step) in float32 for
  every (key, coefficient) pair of the step (``delta``: an optional precomputed float32 term, the low-rank
  product), then rounded into x: stochastically for bf16 weights, with random bits from ``rounding_key``.

Element j of a direction's noise is ``tl.randn(key, j)``: Philox4x32-10 of the counter j under the stream's
key, a pure function of (key, j) whatever the launch grid, so training and replay, and every replica, make
the same numbers on the same kind of device. zo/philox.py holds the plain reference of both kernels
(``perturbed_reference``, ``updated_reference``); under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
and agree with it bit for bit (tests/zo/test_kernels.py). Triton is imported only when a kernel is first used
(the optional ``gpu`` extra).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import RayS2PError

BLOCK = 1024
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class KernelUnavailable(RayS2PError, RuntimeError):
    """The fused kernels cannot run here (no Triton, or a weight dtype they do not handle)."""


def _kernels() -> Any:
    """zo/triton_kernels.py, imported on first use (``TRITON_INTERPRET`` is read when triton is imported)."""
    try:
        from . import triton_kernels
    except ImportError as exc:
        raise KernelUnavailable("the fused noise kernels need Triton. Fix: pip install 'ray_s2p[gpu]' "
                                "(Linux x86_64)") from exc
    return triton_kernels.triton, triton_kernels.perturb_kernel, triton_kernels.update_kernel


def _check(x: torch.Tensor, what: str) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise KernelUnavailable(f"the fused {what} handles float32 and bfloat16 weights, not {x.dtype}")
    if not x.is_contiguous():
        raise KernelUnavailable(f"the fused {what} needs a contiguous tensor")


def perturb(x: torch.Tensor, key: int, radius: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + radius z`` rounded to nearest into ``out`` (default: a new tensor like ``x``), z = Philox normals
    of (``key``, element index); one read of x, one write of out."""
    _check(x, "probe")
    out = torch.empty_like(x) if out is None else out
    triton, kernel, _ = _kernels()
    n = x.numel()
    if out.dtype not in KERNEL_DTYPES or out.shape != x.shape:
        raise KernelUnavailable(f"the fused probe writes a float32 or bfloat16 copy of x's shape, not {out.dtype} "
                                f"{tuple(out.shape)}")
    kernel[(triton.cdiv(n, BLOCK),)](x, out, n, int(key), float(radius), OUT_BF16=out.dtype == torch.bfloat16,
                                     BLOCK=BLOCK)
    return out


def update(x: torch.Tensor, pairs: Sequence[tuple[int, float]], param_scale: float = 1.0,
           sign_step: float | None = None, rounding_key: int = 0, delta: torch.Tensor | None = None) -> None:
    """In place, one pass: ``x <- param_scale x + delta + sum_i c_i z_i`` over the (key, coefficient) ``pairs``
    in order (with ``sign_step = a``: ``x <- param_scale x - a sign(delta + sum_i c_i z_i)``), in float32, rounded
    stochastically into bf16 weights with the random bits of ``rounding_key`` (zo/philox.py
    ``updated_reference``). ``delta``: an optional float32 tensor of x's size (a low-rank product)."""
    _check(x, "update")
    if delta is not None and (delta.dtype != torch.float32 or delta.numel() != x.numel()
                              or not delta.is_contiguous() or delta.device != x.device):
        raise KernelUnavailable(f"the fused update's delta must be a contiguous float32 tensor of x's size on "
                                f"{x.device}, not {delta.dtype} {tuple(delta.shape)} on {delta.device}")
    triton, _, kernel = _kernels()
    keys = torch.tensor([int(k) for k, _ in pairs] or [0], dtype=torch.int64, device=x.device)
    coefs = torch.tensor([float(c) for _, c in pairs] or [0.0], dtype=torch.float32, device=x.device)
    n = x.numel()
    kernel[(triton.cdiv(n, BLOCK),)](x, x if delta is None else delta, n, keys, coefs, len(pairs),
                                     float(param_scale), float(sign_step or 0.0), int(rounding_key),
                                     SIGNED=sign_step is not None, ROUND_BF16=x.dtype == torch.bfloat16,
                                     HAS_DELTA=delta is not None, BLOCK=BLOCK)
