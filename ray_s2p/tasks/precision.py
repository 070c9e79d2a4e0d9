"""Mixed precision for forwards: autocast over fp32 master parameters.

Parameters always stay fp32: the perturbation x + t z and the update are done in
fp32 (a bf16 parameter would round most updates of size lr * g away). Only the
matmuls of the forward run in bf16/fp16 under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(precision: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A context for one forward: nothing for fp32, ``torch.autocast`` on the model's device otherwise.

    Args:
        precision: ``task.precision``: fp32, bf16 or fp16.
        model: the model (its first parameter gives the device type).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    return torch.autocast(device_type=device, dtype=_DTYPES[precision])
