"""Low-rank directions (LOZO, Chen et al. 2024): Z = U V^T / sqrt(r) for each 2-D weight.

For a weight W of shape (m, n) the direction is ``Z = U V^T / sqrt(r)`` with
U (m x r) and V (n x r) standard normal, views into the direction's factor streams
(factors.py). Each entry of Z is a sum of r products of independent N(0, 1)
factors divided by sqrt(r): mean 0, variance 1, and entries are uncorrelated
(E[Z_ab Z_cd] = 0 unless (a, b) = (c, d)), so E[vec(Z) vec(Z)^T] = I, the
covariance of a Gaussian direction; the two-point estimate
(f(x + rho Z) - f(x - rho Z)) / (2 rho) still estimates the directional
derivative along Z (docs/method.md, section 7).

What makes them cheap is that Z never needs to exist:

- probes: a linear layer's output gets ``rho * (x V) U^T / sqrt(r)`` added
  (``add_output_delta``), an embedding's output the rows ``rho * U[ids] V^T / sqrt(r)``;
  W itself is never touched, so it stays bitwise intact;
- updates: N directions of one step are one product per matrix,
  ``W += [c_1 U_1 ... c_N U_N] [V_1 ... V_N]^T / sqrt(r)`` (``add_lowrank``).

Lazy V (LOZO's "lazy sampling"): with ``interval > 1`` V is drawn from
(run seed, window) instead of the direction's seed, so it stays the same for
``interval`` steps and is shared by all directions of those steps.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def materialise(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Z = U V^T / sqrt(r) as a full (m, n) float32 tensor (for mechanisms that need it)."""
    return (u @ v.T).mul_(1.0 / math.sqrt(u.shape[1]))


def is_conv1d(module: torch.nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 style): y = x @ W + b with W of shape (in, out).

    Recognised by shape, not by import: this module must not depend on transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def supports_output_delta(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """True when a low-rank perturbation of ``param`` can be added to ``module``'s output."""
    if getattr(module, "weight", None) is not param or param.ndim != 2:
        return False
    if isinstance(module, torch.nn.Linear) or is_conv1d(module):
        return True
    # max_norm renormalises the gathered rows, which is not linear in W: use a perturbed copy there.
    return isinstance(module, torch.nn.Embedding) and module.max_norm is None


def add_output_delta(module: torch.nn.Module, inputs: tuple, output: torch.Tensor, u: torch.Tensor,
                     v: torch.Tensor, radius: float) -> torch.Tensor:
    """The module's output with what ``radius * Z`` in place of 0 adds to it, Z = U V^T / sqrt(r).

    - nn.Linear, W (out, in) = U V^T: x Z^T = (x V) U^T;
    - Conv1D, W (in, out) = U V^T: x Z = (x U) V^T;
    - nn.Embedding, W (rows, dim): Z[ids] = U[ids] V^T.

    A float32 or bf16 contiguous output (a fresh tensor made by the module) gets the delta added in
    place, as one ``addmm_`` of the skinny factors in the output's dtype: no output-sized temporary
    and no float32 round trip of the activations (a bf16 layer's delta is made from its bf16 input
    and factors rounded to bf16, accumulated in float32 inside the GEMM and rounded once into the
    output). Other outputs (fp16, non-contiguous) get a float32 delta rounded to their dtype.
    """
    rank = u.shape[1]
    scale = radius / math.sqrt(rank)
    x = inputs[0]
    in_place = output.dtype in (torch.float32, torch.bfloat16) and output.is_contiguous()
    dtype = output.dtype if in_place else torch.float32
    # x @ V is written as linear(x, V^T) with V^T contiguous: the skinny (tokens x n) @ (n x r) GEMM
    # takes a slow path in the BLAS otherwise (about 5x slower on a CPU, measured in docs/benchmarks.md).
    if isinstance(module, torch.nn.Embedding):
        left, right = u[x].to(dtype), v.to(dtype)
    elif is_conv1d(module):
        left, right = torch.nn.functional.linear(x.to(dtype), u.T.contiguous().to(dtype)), v.to(dtype)
    else:
        left, right = torch.nn.functional.linear(x.to(dtype), v.T.contiguous().to(dtype)), u.to(dtype)
    if in_place:
        output.view(-1, output.shape[-1]).addmm_(left.reshape(-1, rank), right.T, alpha=scale)
        return output
    return output + (left @ right.T).mul_(scale).to(output.dtype)


def _stacked(factors: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    # [c_1 U_1, ..., c_N U_N] and [V_1, ..., V_N]: the sum of N rank-r products is one (m x Nr) @ (Nr x n).
    rank = factors[0][1].shape[1]
    us = torch.cat([u * c for c, u, _ in factors], dim=1)
    vs = torch.cat([v for _, _, v in factors], dim=1)
    return us, vs, 1.0 / math.sqrt(rank)


def lowrank_sum(factors: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_i c_i U_i V_i^T / sqrt(r) as a new float32 (m, n) tensor: one product, for an update that adds it in
    its own pass (the fused update of counter-based noise, zo/counter_noise.py)."""
    us, vs, alpha = _stacked(factors)
    return (us @ vs.T).mul_(alpha)


def add_lowrank(param: torch.Tensor, factors: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> None:
    """param += sum_i c_i U_i V_i^T / sqrt(r), as one (m x Nr) @ (Nr x n) product, in place.

    With lazy V, ``apply_update`` sums the U's over the flat stream first and passes one factor.

    The product is formed in float32 and added once; for a float32 parameter ``addmm_``
    adds it without a temporary of the parameter's size.
    """
    if not factors:
        return
    us, vs, alpha = _stacked(factors)
    if param.dtype == torch.float32:
        param.addmm_(us, vs.T, alpha=alpha)
    else:
        param.add_((us @ vs.T).mul_(alpha).to(param.dtype))
