"""Which parameters move: ``task.trainable`` modes and LoRA adapters.

Modes (``TaskConfig.trainable``):

- ``all``: every parameter.
- ``head``: the output modules (classifier, lm_head, fc).
- ``top_k``: the last ``top_k`` blocks and everything after them (pooler or final
  norm, head), i.e. the suffix of the chain from block L - top_k on.
- ``bitfit``: every bias (Zaken et al., 2022).
- ``lora``: the ``lora_`` adapter matrices added by ``apply_lora`` (plus the head of
  a classifier whose head is new, which would otherwise stay random).
- ``patterns``: names matching any ``fnmatch`` pattern in ``task.patterns``.

``select_trainable`` also sets ``requires_grad`` so that only selected parameters
take part in first-order baselines.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn

from .anatomy import Anatomy, unwrap
from .errors import TaskError

# Default LoRA targets per architecture (module-name suffixes, as peft matches them).
LORA_TARGETS = {
    "bert": ("query", "value"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "vision": ("conv", "conv1", "conv2"),
}


def _names_of(model: nn.Module, modules: Sequence[nn.Module]) -> set[str]:
    wanted = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in wanted}


def select_trainable(model: nn.Module, anatomy: Anatomy, mode: str, *, top_k: int = 1,
                     patterns: Sequence[str] = ()) -> list[str]:
    """Names of the parameters to train (``named_parameters`` order); sets ``requires_grad`` to match.

    Args:
        model: the model (possibly peft-wrapped).
        anatomy: its anatomy (blocks and head for ``head`` / ``top_k``).
        mode: ``task.trainable``.
        top_k: ``task.top_k`` (blocks counted from the end).
        patterns: ``task.patterns`` (fnmatch on parameter names).

    Raises:
        TaskError: top_k larger than the number of blocks, a mode that matches nothing, or
            ``lora`` on a model without adapters.
    """
    names = [n for n, _ in model.named_parameters()]
    if mode == "all":
        chosen = set(names)
    elif mode == "head":
        chosen = _names_of(model, anatomy.head)
    elif mode == "top_k":
        if top_k > len(anatomy.blocks):
            raise TaskError(f"config field 'task.top_k': {top_k} exceeds the model's {len(anatomy.blocks)} blocks. "
                            f"Fix: use 1..{len(anatomy.blocks)} or trainable=all")
        chosen = _names_of(model, anatomy.chain[len(anatomy.blocks) - top_k:])
    elif mode == "bitfit":
        chosen = {n for n in names if n.endswith("bias")}
    elif mode == "lora":
        chosen = {n for n in names if "lora_" in n or ".modules_to_save." in n}
        if not chosen:
            raise TaskError("config field 'task.trainable': lora selected but the model has no LoRA adapters. "
                            "Fix: build the model with the task's build_model (it adds them)")
    elif mode == "patterns":
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    else:
        raise TaskError(f"config field 'task.trainable': unknown mode {mode!r}. "
                        f"Fix: use all, head, bitfit, lora, top_k or patterns")
    if not chosen:
        hint = {"bitfit": "this model has no bias parameters; use lora or top_k",
                "patterns": f"no parameter name matches {list(patterns)}; names look like {names[:3]}",
                "head": "no head module was found; use patterns"}.get(mode, "check the selection")
        raise TaskError(f"config field 'task.trainable': mode {mode!r} selects no parameter. Fix: {hint}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return [n for n in names if n in chosen]


def default_lora_targets(model_type: str) -> tuple[str, ...]:
    """peft target-module names for an architecture.

    Raises:
        TaskError: no default is known (set ``task.lora_targets``).
    """
    if model_type not in LORA_TARGETS:
        raise TaskError(f"config field 'task.lora_targets': no default LoRA targets for model type {model_type!r}. "
                        f"Fix: list the module names to adapt, e.g. [q_proj, v_proj]")
    return LORA_TARGETS[model_type]


def apply_lora(model: nn.Module, *, r: int, alpha: int, targets: Sequence[str], model_type: str,
               head: Sequence[nn.Module] = (), seed: int, last_blocks: int = 0) -> nn.Module:
    """Wrap the model with LoRA adapters (peft), initialised identically on every replica.

    lora_B starts at zero (so the wrapped model computes exactly what the base does); lora_A
    is drawn from a private seed inside ``fork_rng`` (peft draws it from the global RNG).

    Args:
        model: the base model.
        r, alpha: LoRA rank and scale (``task.lora_r``, ``task.lora_alpha``).
        targets: module-name suffixes to adapt.
        model_type: architecture name (GPT-2's Conv1D needs ``fan_in_fan_out``).
        head: head modules that must also train (a fresh classifier); peft's ``modules_to_save``.
        seed: initialisation seed.
        last_blocks: adapt only the last N blocks (``task.lora_blocks``; peft's ``layers_to_transform``);
            0 adapts every block.

    Raises:
        TaskError: targets that match no module, or ``last_blocks`` beyond the model's blocks.
    """
    from peft import LoraConfig, get_peft_model

    head_names = [name for name, m in unwrap(model).named_modules() if any(m is h for h in head)]
    layers = None
    if last_blocks:
        total = int(getattr(unwrap(model).config, "num_hidden_layers", 0) or 0)
        if not 0 < last_blocks <= total:
            raise TaskError(f"config field 'task.lora_blocks': {last_blocks} is not within the model's {total} blocks. "
                            f"Fix: use 1..{total}, or 0 for every block")
        layers = list(range(total - last_blocks, total))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                        fan_in_fan_out=model_type == "gpt2", modules_to_save=head_names or None,
                        layers_to_transform=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as exc:
            raise TaskError(f"config field 'task.lora_targets': {list(targets)} do not match modules of this model "
                            f"({exc}). Fix: list existing module names") from exc
    wrapped.eval()
    return wrapped
