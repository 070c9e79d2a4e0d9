"""Which parameters weight decay spares (``optimizer.weight_decay_exempt``).

MeZO's trainer decays a parameter only when its name holds none of "bias",
"layer_norm", "layernorm"; torch's and Hugging Face's AdamW recipes do the same
with "bias" and "LayerNorm.weight". The reason is the same everywhere: pulling a
bias or a normalisation gain towards 0 is not a regulariser on the function's
complexity, it shifts or shrinks every activation of the layer.

``bias_norm`` (the default) spares:

* every bias: a parameter whose own name ends in "bias" (``bias``, ``in_proj_bias``);
* every parameter of a normalisation module: a module whose class name holds "norm"
  (LayerNorm, RMSNorm and its Llama/T5/Qwen spellings, GroupNorm, BatchNorm);
* MeZO's name rule, for norm parameters that hang on another module: a full name
  holding "layer_norm" or "layernorm" (any case).

Deciding by module type rather than name alone catches RMSNorm and GroupNorm
weights, which MeZO's name list (written for OPT and RoBERTa) misses. ``none``
decays every selected parameter (the harness's behaviour before this option).
"""

from __future__ import annotations

from typing import Sequence

import torch

EXEMPTIONS = ("bias_norm", "none")


def owner_classes(model: torch.nn.Module) -> dict[str, str]:
    """Full parameter name -> class name of the module that registered it (tied parameters: the first)."""
    owners: dict[str, str] = {}
    for prefix, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{prefix}.{local}" if prefix else local, type(module).__name__)
    return owners


def is_exempt(name: str, owner_class: str) -> bool:
    """True when ``bias_norm`` spares parameter ``name`` owned by a module of class ``owner_class``."""
    local = name.rsplit(".", 1)[-1]
    lowered = name.lower()
    return (local.endswith("bias") or "norm" in owner_class.lower()
            or "layer_norm" in lowered or "layernorm" in lowered)


def decay_exempt(model: torch.nn.Module, names: Sequence[str], rule: str = "bias_norm") -> tuple[bool, ...]:
    """One flag per selected name: True when weight decay must leave that parameter alone.

    Args:
        model: the model the names belong to.
        names: the selected (trainable) parameter names, in canonical order.
        rule: ``bias_norm`` (biases and normalisation parameters are spared) or ``none``.

    Returns:
        A tuple aligned with ``names``.

    Raises:
        ValueError: an unknown rule.
    """
    if rule not in EXEMPTIONS:
        raise ValueError(f"optimizer.weight_decay_exempt: unknown rule {rule!r}. Fix: use bias_norm or none")
    if rule == "none":
        return tuple(False for _ in names)
    owners = owner_classes(model)
    return tuple(is_exempt(n, owners.get(n, "")) for n in names)
