"""A model's forward pass cut into a chain: entry -> blocks -> select -> post -> head.

Two features need to know where the parameters sit along the forward pass:
``top_k`` / ``head`` selection (the last k blocks, the head) and feature reuse
(run the frozen prefix once, replay only the rest). An ``Anatomy`` names the
pieces without copying the model's code:

    entry modules   embeddings; run inside the model's own backbone call
    blocks          the repeated layers, called as block(h, *args, **kwargs)
    select          a parameter-free reduction after the blocks (e.g. gather the
                    last prompt position), so later stages touch B rows, not B*T
    post            per-position modules after the blocks (BERT pooler, final norm)
    head            the classifier / lm_head / fc

Stage i of the chain is ``(blocks + post + head)[i]``; entry modules are stage -1.
For Hugging Face models the arguments every block receives (attention mask,
position ids, rotary tables) are not rebuilt here: ``capture_block_inputs``
runs the model's backbone and stops it at the first block with a pre-hook, so
the masks are exactly the ones the model's own forward would build. The blocks
are then called with those same arguments; in the supported families (BERT,
GPT-2, Llama) every block of the loop receives identical arguments, which is
what makes the replay exact (tests compare it with the plain forward).

All modules are called through ``Module.__call__`` so the perturbation hooks of
``ray_s2p.zo.probes`` fire (they swap a module's parameters around its call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import TaskError

Batch = dict[str, Any]
Select = Callable[[torch.Tensor, Batch], torch.Tensor]
Entry = Callable[[Batch], tuple[torch.Tensor, tuple, dict]]

# Families whose backbone calls its blocks in a plain loop with identical arguments, so the chain
# can be replayed (checked against the plain forward in tests). Others still get trainable
# selection; feature reuse is then off. Causal LMs: model_type -> the backbone's final norm.
REPLAYABLE_SEQUENCE_CLASSIFIERS = ("bert",)
REPLAYABLE_CAUSAL_LMS = {"gpt2": "ln_f", "llama": "norm"}


def _identity(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    return hidden


@dataclass(frozen=True)
class Anatomy:
    """The pieces of one model instance, in forward order (see the module docstring).

    Attributes:
        entry_modules: modules run before the first block (their parameters are stage -1).
        blocks: the repeated layers.
        post: modules after the blocks, before the head.
        head: the output modules.
        entry: batch -> (hidden, block args, block kwargs); None when the chain cannot be replayed
            (an architecture we do not know), which disables feature reuse but not selection.
        select: applied once to the hidden states when the chain passes from blocks to post.
    """

    entry_modules: tuple[nn.Module, ...]
    blocks: tuple[nn.Module, ...]
    post: tuple[nn.Module, ...]
    head: tuple[nn.Module, ...]
    entry: Entry | None = None
    select: Select = _identity
    stage_of: dict[int, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        stages: dict[int, int] = {}
        # A tied parameter (GPT-2's lm_head = wte) belongs to its earliest stage: perturbing it
        # changes the embeddings too, so it can never sit behind a cached prefix.
        for i, module in enumerate(self.chain):
            for p in module.parameters():
                stages.setdefault(id(p), i)
        for module in self.entry_modules:
            for p in module.parameters():
                stages[id(p)] = -1
        self.stage_of.update(stages)

    @property
    def chain(self) -> tuple[nn.Module, ...]:
        """Blocks, then post, then head: stage i is ``chain[i]``."""
        return self.blocks + self.post + self.head

    def first_stage(self, model: nn.Module, trainable: list[str]) -> int:
        """Earliest stage holding a trainable parameter; -1 if any sits in the entry or outside the chain."""
        named = dict(model.named_parameters())
        stages = [self.stage_of.get(id(named[n]), -1) for n in trainable if n in named]
        return min(stages) if stages else -1

    def run(self, hidden: torch.Tensor, args: tuple, kwargs: dict, batch: Batch, start: int, stop: int) -> torch.Tensor:
        """Run stages ``start..stop-1`` on ``hidden`` (the input of stage ``start``)."""
        chain, num_blocks = self.chain, len(self.blocks)
        h = hidden
        for i in range(start, stop):
            if i == num_blocks:
                h = self.select(h, batch)
            if i < num_blocks:
                out = chain[i](h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
            else:
                h = chain[i](h)
        return h


# ---------------------------------------------------------------- Hugging Face models
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_blocks(backbone: nn.Module, num_layers: int | None) -> nn.ModuleList | None:
    """The first ModuleList in the backbone with one entry per hidden layer."""
    for _, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (num_layers is None or len(module) == num_layers):
            return module
    return None


class _BlockInputs(Exception):
    """Raised by the capture hook to stop the backbone at its first block."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("block inputs captured")
        self.block_args, self.block_kwargs = args, kwargs


def capture_block_inputs(backbone: nn.Module, first_block: nn.Module, batch: Batch) -> tuple[torch.Tensor, tuple, dict]:
    """Run the backbone up to its first block; return that block's (hidden, args, kwargs).

    The hook is prepended so it runs before any other pre-hook on the block (a perturbation
    hook must not swap parameters in and then miss its restoring post-hook).
    """
    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _BlockInputs(args, kwargs)

    handle = first_block.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _BlockInputs as got:
        args, kwargs = tuple(got.block_args), dict(got.block_kwargs)
    else:
        raise TaskError("the backbone never called its first block; feature reuse cannot cut this model")
    finally:
        handle.remove()
    if args:
        return args[0], args[1:], kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def hf_anatomy(model: nn.Module, kind: str, select: Select = _identity,
               head: tuple[nn.Module, ...] | None = None) -> Anatomy:
    """Anatomy of a transformers model (optionally peft-wrapped).

    Args:
        model: an ``AutoModelForSequenceClassification`` (kind ``sequence_classification``) or an
            ``AutoModelForCausalLM`` (kind ``causal_lm``) model.
        kind: which of the two.
        select: the reduction between blocks and post (causal LMs: e.g. the last prompt position).
        head: causal LMs: the modules the task scores with instead of the lm_head (prompt
            classification's label-word head); None for the lm_head.
    """
    inner = unwrap(model)
    backbone = inner.base_model
    config = inner.config
    blocks_list = find_blocks(backbone, getattr(config, "num_hidden_layers", None))
    blocks = tuple(blocks_list) if blocks_list is not None else ()
    model_type = getattr(config, "model_type", "")
    entry_modules = tuple(m for m in (inner.get_input_embeddings(),) if m is not None)
    if kind == "sequence_classification":
        head = tuple(m for m in (getattr(inner, "classifier", None) or getattr(inner, "score", None),) if m is not None)
        if model_type in REPLAYABLE_SEQUENCE_CLASSIFIERS and blocks and getattr(backbone, "pooler", None) is not None:
            return Anatomy((backbone.embeddings,), blocks, (backbone.pooler,), head,
                           entry=lambda batch: capture_block_inputs(backbone, blocks[0], batch))
        return Anatomy(entry_modules, blocks, (), head)
    if kind != "causal_lm":
        raise ValueError(f"unknown model kind {kind!r}")
    head = head if head is not None else (inner.get_output_embeddings(),)
    norm_name = REPLAYABLE_CAUSAL_LMS.get(model_type)
    norm = getattr(backbone, norm_name, None) if norm_name else None
    if norm is not None and blocks:
        if model_type == "gpt2":
            entry_modules = (backbone.wte, backbone.wpe)
        return Anatomy(entry_modules, blocks, (norm,), head,
                       entry=lambda batch: capture_block_inputs(backbone, blocks[0], batch), select=select)
    return Anatomy(entry_modules, blocks, (), head, select=select)
