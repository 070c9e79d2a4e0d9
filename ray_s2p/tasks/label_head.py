"""The label-word head of prompt classification: the output-embedding rows the loss reads, and nothing else.

Prompt classification scores class c by the logit of label word c at the answer position:
``h . E[w_c]`` where ``E`` is the LM's output embedding (tied to the input embedding in most
small LMs, SmolLM2 and GPT-2 among them). The loss reads ``len(label_words)`` rows of ``E``
and no other, so the task keeps those rows as their own (num_labels, d) parameter:

- perturbing "the head" perturbs 2 x 576 numbers for SmolLM2-135M, not its 49,152 x 576
  embedding (noise in rows the loss never reads only adds variance to the two-point estimate
  and costs a model-sized draw per probe);
- the LM stays as it was loaded (tied weights stay tied), so the input embeddings and every
  frozen block before the trainable ones stay frozen and their output can be cached;
- scoring costs B x num_labels x d, not B x vocab x d.

``merged_copy`` writes the rows back into an output embedding of their own, so the saved model
loads in plain transformers and gives the trained label-word logits.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .anatomy import unwrap
from .hf_models import untie_output_embeddings

ATTRIBUTE = "label_head"


class LabelWordHead(nn.Module):
    """Logits of the label words: ``hidden @ weight.T`` with ``weight`` the label words' output-embedding rows.

    Attributes:
        weight: (num_labels, d), a copy of the output embedding's rows ``token_ids``.
        token_ids: the label words' first tokens (a buffer, not trained).
    """

    def __init__(self, rows: torch.Tensor, token_ids: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(rows.detach().clone())
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, num_labels)."""
        return hidden @ self.weight.to(hidden.dtype).t()


def attach_label_head(lm: nn.Module, token_ids: Sequence[int]) -> LabelWordHead:
    """Give a causal LM (or its peft wrapper's base) a ``label_head`` copied from its output embedding.

    The copy starts equal to the rows, so the logits start equal to the LM's own.

    Raises:
        ValueError: the model has no output embedding with a 2-D weight, or has a bias on it.
    """
    inner = unwrap(lm)
    out = inner.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None or out.weight.dim() != 2:
        raise ValueError("prompt classification needs a causal LM with an output embedding (lm_head)")
    if getattr(out, "bias", None) is not None:
        raise ValueError("prompt classification: an lm_head with a bias is not supported")
    head = LabelWordHead(out.weight[list(token_ids)], token_ids).to(out.weight.device)  # same dtype and device
    inner.add_module(ATTRIBUTE, head)
    return head


def label_head_of(model: nn.Module) -> LabelWordHead | None:
    """The model's label head (set by ``attach_label_head``), or None for a plain LM (e.g. a saved one)."""
    return getattr(unwrap(model), ATTRIBUTE, None)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of the model without its label head, whose output embedding carries the head's rows.

    A tied output embedding is untied first (a copy of the input embedding), so writing the label
    rows does not move the input embedding of those tokens. A LoRA wrapper is merged.
    """
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    head = getattr(model, ATTRIBUTE, None)
    if head is None:
        return model
    delattr(model, ATTRIBUTE)
    untie_output_embeddings(model)
    out = model.get_output_embeddings()
    with torch.no_grad():
        out.weight[head.token_ids.to(out.weight.device)] = head.weight.to(out.weight.dtype)
    return model
