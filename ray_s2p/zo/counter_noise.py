"""Counter-based directions and rounding (``perturbation.noise: philox``): the fused kernels on an accelerator,
the plain reference on a CPU.

Element j of parameter i's noise for direction seed s is ``randn(mix_seed(s, i), j)`` (zo/philox.py): Philox
of the element's index under the parameter's key. A probe's perturbed copy and a step's whole update are one
pass over each weight: on an accelerator the Triton kernels of zo/kernels.py, on a CPU the reference, cut into
slices of ``noise.CHUNK`` elements run on the space's noise threads (each element depends only on its own
index, so the slicing changes no bit). A bf16 weight's update is rounded stochastically with the bits of the
rounding key ``mix_seed(run_seed, step, i)``, a function of the run, the step and the parameter only, so every
replica and every replay round alike. Low-rank directions keep their factors (zo/factors.py); their update is
the float32 product handed to the same one-pass update as ``delta``, with the same rounding.

The kernels' Box-Muller runs on the GPU's float32 library (libdevice), the reference on numpy's: the two agree
to a few ulps, not bit for bit, so ``implementation`` names which made a run's noise and the environment record
(zo/environment.py) keeps it; a replay is bitwise only with the same implementation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from . import kernels, philox
from .jobs import Job
from .noise import chunk_bounds

NOISE_DTYPES = (torch.float32, torch.bfloat16)


def backend(device: torch.device) -> str:
    """``triton`` where the weights live on an accelerator, ``reference`` on a CPU."""
    return "reference" if device.type == "cpu" else "triton"


def implementation(device: torch.device) -> str:
    """What makes the noise on ``device``, for the environment record: 'philox/triton 3.9.0' or
    'philox/reference numpy 2.3.5'."""
    if backend(device) == "triton":
        try:
            import triton
        except ImportError:
            return "philox/triton (not installed)"
        return f"philox/triton {triton.__version__}"
    return f"philox/reference numpy {np.__version__}"


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse weights the counter-based noise does not handle.

    Raises:
        ValueError: ``dtype`` is neither float32 nor bfloat16.
    """
    if dtype not in NOISE_DTYPES:
        raise ValueError(f"perturbation.noise 'philox' handles float32 and bfloat16 weights, not {dtype}. "
                         "Fix: set precision.weights to fp32 or bf16, or perturbation.noise to generator")


def _slices(numel: int) -> list[tuple[int, int]]:
    return chunk_bounds(numel, "cpu")


def normal(numel: int, key: int, device: torch.device) -> torch.Tensor:
    """The ``numel`` float32 normals of stream ``key`` (element j: ``randn(key, j)``) on ``device``."""
    if backend(device) == "triton":
        # 0 + 1 * z is z exactly in float32: the probe kernel makes the bare noise.
        return kernels.perturb(torch.zeros(numel, dtype=torch.float32, device=device), key, 1.0)
    return philox.randn(key, torch.arange(numel)).to(device)


def perturb_jobs(out: torch.Tensor, x: torch.Tensor, key: int, radius: float) -> list[Job]:
    """Jobs that write ``x + radius z`` (z of stream ``key``) into ``out``, rounded to nearest into its dtype.

    Args:
        out: 1-D, contiguous, x's size, float32 or x's dtype.
        x: the weight, flattened (1-D); read only.
        key: the parameter's stream key, ``mix_seed(seed, index)``.
        radius: the probe's signed radius (times the direction's scale).
    """
    check_dtype(x.dtype)
    if backend(x.device) == "triton":
        def fused() -> None:
            kernels.perturb(x.contiguous(), key, radius, out)
        return [(x.numel(), fused)]

    def part(lo: int, hi: int) -> Callable[[], None]:
        def run() -> None:
            out[lo:hi].copy_(philox.perturbed_reference(x[lo:hi], key, radius, start=lo))
        return run
    return [(hi - lo, part(lo, hi)) for lo, hi in _slices(x.numel())]


def update_jobs(x: torch.Tensor, pairs: Sequence[tuple[int, float]], param_scale: float,
                sign_step: float | None, rounding_key: int, delta: torch.Tensor | None = None) -> list[Job]:
    """Jobs that apply a step to the weight ``x`` in place, one pass: ``x <- param_scale x + delta + sum_i c_i
    z_i`` in float32 over the (stream key, coefficient) ``pairs`` in order (with ``sign_step = a``: ``- a
    sign(delta + sum_i c_i z_i)``), rounded stochastically into a bf16 x with the bits of ``rounding_key``
    (zo/philox.py ``updated_reference``).

    Args:
        delta: an optional float32 term of x's size, added first: the sum of a step's low-rank products, or of
            the factor-stream noise of small parameters, so that low-rank directions get the same one-pass
            update and rounding.
    """
    check_dtype(x.dtype)
    pairs = list(pairs)
    flat_delta = None if delta is None else delta.to(torch.float32).reshape(-1).contiguous()
    if backend(x.device) == "triton":
        def fused() -> None:
            if x.is_contiguous():
                kernels.update(x, pairs, param_scale, sign_step, rounding_key, flat_delta)
            else:  # the same bits on a contiguous copy, written back
                work = x.contiguous()
                kernels.update(work, pairs, param_scale, sign_step, rounding_key, flat_delta)
                x.copy_(work)
        return [(x.numel(), fused)]
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is None:
        def whole() -> None:
            x.copy_(philox.updated_reference(x, pairs, param_scale, sign_step, rounding_key, delta=flat_delta))
        return [(x.numel(), whole)]

    def part(lo: int, hi: int, segment: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            part_delta = None if flat_delta is None else flat_delta[lo:hi]
            segment.copy_(philox.updated_reference(segment, pairs, param_scale, sign_step, rounding_key, start=lo,
                                                   delta=part_delta))
        return run
    return [(hi - lo, part(lo, hi, flat[lo:hi])) for lo, hi in _slices(x.numel())]
