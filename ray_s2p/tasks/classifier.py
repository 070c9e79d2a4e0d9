"""What every classification task shares: cross-entropy on its logits, and one eval record.

A task that defines ``logits(model, batch)`` and ``prepare(model, batch, trainable)``
gets ``loss`` and ``eval_totals`` from ``LogitsClassifier`` (sequence, prompt and
image classification).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .base import Batch, EvalTotals
from .feature_reuse import trainable_by_flags


def classification_totals(logits: torch.Tensor, labels: torch.Tensor) -> EvalTotals:
    """Summed cross-entropy, count, arg-max predictions and labels of one eval batch."""
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return EvalTotals(float(loss), int(labels.numel()), logits.argmax(-1).tolist(), labels.tolist())


class LogitsClassifier:
    """``loss`` and ``eval_totals`` from the subclass's ``logits`` and ``prepare``."""

    # No stubs of logits/prepare here: this mixin comes first in the subclasses' bases, so a stub
    # would hide HFTextTask.prepare.
    logits: Callable[[torch.nn.Module, Batch], torch.Tensor]
    prepare: Callable[[torch.nn.Module, Batch, list[str]], Batch]

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the batch."""
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    def eval_totals(self, model: torch.nn.Module, batch: Batch) -> EvalTotals:
        """Summed cross-entropy, count, arg-max predictions and labels (frozen prefix cached across evals)."""
        batch = self.prepare(model, batch, trainable_by_flags(model)) if "features" not in batch else batch
        return classification_totals(self.logits(model, batch), batch["labels"])
