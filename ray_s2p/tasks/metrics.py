"""Evaluation metrics from summed totals (``EvalTotals`` merged over shards by the driver)."""

from __future__ import annotations

import math
from typing import Sequence

from .base import EvalTotals


def classification_metrics(totals: EvalTotals) -> dict[str, float]:
    """Mean loss, and for classification totals accuracy and macro-F1.

    Macro-F1 averages the per-class F1 = 2 TP / (2 TP + FP + FN) over every class that
    occurs among the labels or the predictions (scikit-learn's ``f1_score(average="macro")``
    convention, a class with no true and no predicted examples does not count). Totals
    without predictions (language modelling) give ``loss`` and ``perplexity``.

    Args:
        totals: loss sum, example (or token) count, predictions and labels.

    Returns:
        ``{"loss", "accuracy", "macro_f1"}`` or ``{"loss", "perplexity"}``; NaN loss when
        the count is zero.
    """
    loss = totals.loss_sum / totals.count if totals.count else math.nan
    if totals.predictions is None or totals.labels is None:
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if not math.isnan(loss) else math.nan}
    preds, labels = totals.predictions, totals.labels
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels; merge totals with EvalTotals.merge")
    if not labels:
        return {"loss": loss, "accuracy": math.nan, "macro_f1": math.nan}
    accuracy = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    f1s = []
    for cls in sorted(set(labels) | set(preds)):
        tp = sum(p == cls and y == cls for p, y in zip(preds, labels, strict=True))
        fp = sum(p == cls and y != cls for p, y in zip(preds, labels, strict=True))
        fn = sum(p != cls and y == cls for p, y in zip(preds, labels, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn))  # denominator > 0: cls occurs in preds or labels
    return {"loss": loss, "accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def eval_metrics(parts: Sequence[EvalTotals]) -> dict[str, float]:
    """The metrics row of one evaluation from the replicas' shards: ``eval_loss`` (when any example
    counted), ``eval_accuracy`` and ``eval_macro_f1`` (when there are predictions), as
    ``classification_metrics`` computes them over the merged totals."""
    total = EvalTotals()
    for part in parts:
        total = total.merge(part)
    if not total.count:
        return {}
    metrics = classification_metrics(total)
    out = {"eval_loss": metrics["loss"]}
    if total.predictions and total.labels:
        out.update(eval_accuracy=metrics["accuracy"], eval_macro_f1=metrics["macro_f1"])
    return out
