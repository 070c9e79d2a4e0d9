"""Prompt-based classification with a causal LM (MeZO's setting).

Each text becomes ``task.template`` with ``{text}`` filled in (e.g. "{text} It was"),
and class c is scored by the logit of the first token of ``task.label_words[c]``
(e.g. " terrible" / " great") as the *next* token after the prompt:

    loss = CE(softmax over label words of h_last . E[label_ids], y)

where h_last is the final hidden state at the last prompt token and E the output
embedding. The rows E[label_ids] are the model's ``label_head`` (``label_head.py``), a
parameter of their own: the other 49 k rows of a tied embedding are never read by the
loss, so they neither move nor get noise, and the LM keeps its tied weights. Only the B
last positions go through the final norm and the label head. Accuracy comes from the
arg-max label word. ``save_final`` writes the label rows into the saved lm_head.

Models: as for ``causal_lm`` (``tiny-gpt2``, ``smollm2``, a folder or hub name).
Batch keys: ``input_ids``, ``attention_mask`` (B, T), ``labels`` (B,), ``index`` (B,);
``prepare`` may add ``features``. Prompts are truncated from the left so the
template's ending always survives.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import TaskConfig
from .anatomy import unwrap
from .base import Batch
from .causal_lm import causal_lm_from_config
from .classifier import LogitsClassifier
from .errors import TaskError, check_options
from .feature_reuse import replay
from .hf_models import save_hf_model
from .hf_task import HFTextTask
from .label_head import attach_label_head, label_head_of, merged_copy
from .precision import autocast_context
from .text_classification import TEXT_OPTIONS
from .text_encoding import load_text_splits


def last_positions(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, T, d) -> (B, d): the hidden state at each example's last real token (right padding)."""
    last = batch["attention_mask"].sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def label_token_ids(tokenizer: Any, label_words: tuple[str, ...]) -> list[int]:
    """The first token of each label word.

    Raises:
        TaskError: a word with no tokens, or two words sharing their first token.
    """
    ids = []
    for word in label_words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens:
            raise TaskError(f"config field 'task.label_words': {word!r} has no tokens. Fix: use non-empty words")
        if len(tokens) > 1:
            warnings.warn(f"task.label_words: {word!r} is {len(tokens)} tokens; scoring its first token only",
                          stacklevel=2)
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise TaskError(f"config field 'task.label_words': {list(label_words)} share a first token ({ids}). "
                        f"Fix: pick words that start with different tokens (a leading space matters)")
    return ids


class PromptClassificationTask(LogitsClassifier, HFTextTask):
    """``task.name: prompt_classification`` (see the module docstring)."""

    ANATOMY_KIND = "causal_lm"
    anatomy_select = staticmethod(last_positions)

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        check_options(cfg.options, TEXT_OPTIONS, "prompt_classification")
        if "{text}" not in cfg.template:
            raise TaskError(f"config field 'task.template': {cfg.template!r} has no {{text}}. "
                            f"Fix: e.g. '{{text}} It was'")
        if len(cfg.label_words) < 2:
            raise TaskError("config field 'task.label_words': need one word per class (at least 2)")
        if cfg.num_labels is not None and cfg.num_labels != len(cfg.label_words):
            raise TaskError(f"config field 'task.num_labels': {cfg.num_labels} differs from the "
                            f"{len(cfg.label_words)} label words. Fix: leave num_labels null or match them")
        self.cfg = cfg
        self.seed = seed
        self.data = load_text_splits(cfg, mode="prompt", labelled=True, num_labels=len(cfg.label_words),
                                     extra_words=cfg.label_words)
        self.label_ids = torch.tensor(label_token_ids(self.data.tokenizer, cfg.label_words))
        self._init_shared()

    def build_model(self) -> torch.nn.Module:
        """The LM as loaded (see ``causal_lm.build_causal_lm``; tied weights stay tied) with its label head."""
        lm = causal_lm_from_config(self.cfg, self.seed, self.data.tokenizer, untie_head=False)
        attach_label_head(lm, self.label_ids.tolist())
        return lm

    def scoring_head(self, model: torch.nn.Module) -> tuple[torch.nn.Module, ...] | None:
        """The label head: the chain ends there, not at the lm_head (None for a plain LM)."""
        head = label_head_of(model)
        return (head,) if head is not None else None

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, num_label_words) fp32 logits of the label words at the answer position."""
        label_head = label_head_of(model)
        with autocast_context(self.cfg.autocast, model):
            if "features" in batch:
                scores = replay(batch)
            else:
                inner = unwrap(model)
                hidden = inner.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False).last_hidden_state
                head = label_head if label_head is not None else inner.get_output_embeddings()
                scores = head(last_positions(hidden, batch))
        if label_head is None:  # a plain LM (a saved final/): its lm_head scored the whole vocabulary
            scores = scores[:, self.label_ids.to(scores.device)]
        return scores.float()

    def save_final(self, model: torch.nn.Module, directory: Path) -> None:
        """A plain transformers causal LM whose lm_head rows of the label words are the trained ones."""
        save_hf_model(merged_copy(model), self.data.tokenizer, Path(directory))



def build(cfg: TaskConfig, seed: int) -> PromptClassificationTask:
    """Factory for the task registry (name ``prompt_classification``)."""
    return PromptClassificationTask(cfg, seed)
