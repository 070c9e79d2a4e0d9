"""Mixed precision for forwards: autocast over fp32 master parameters, and inputs for half weights.

With ``task.autocast`` the parameters stay fp32: the perturbation x + t z and the
update are done in fp32, and only the matmuls of the forward run in bf16/fp16
under ``torch.autocast``. ``precision.weights: bf16/fp16`` is the other way: the
replica holds the weights themselves in half precision (updates rounded
stochastically, zo/rounding.py); float inputs must then be cast to the weights'
dtype (``match_weights``), and tasks compute their losses from fp32 logits.
"""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(precision: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A context for one forward: nothing for fp32, ``torch.autocast`` on the model's device otherwise.

    Args:
        precision: ``task.autocast``: fp32, bf16 or fp16.
        model: the model (its first parameter gives the device type).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    return torch.autocast(device_type=device, dtype=_DTYPES[precision])


def weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def match_weights(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """A float input in the dtype of the model's weights (unchanged when it already is, or not float).

    Args:
        x: an input tensor (pixels, features).
        model: the model that reads it.

    Returns:
        ``x`` itself for fp32 weights or non-float inputs, else a cast copy.
    """
    dtype = weight_dtype(model)
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
