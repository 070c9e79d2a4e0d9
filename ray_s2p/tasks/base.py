"""The task interface: what a replica needs to build, feed and score a model.

A task is a small object built from a ``TaskConfig`` and the run seed. Replicas
build their own task (so no model or data ever crosses the network), ask it for
the batch of a given (step, shard) and evaluate its loss under perturbations.
Batches must be a pure function of (seed, step, shard, num_shards): that is what
makes recovery and replay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

Batch = dict[str, Any]


@dataclass
class EvalTotals:
    """Sums over evaluation batches, so shards can be added up by the driver."""

    loss_sum: float = 0.0
    count: int = 0
    predictions: list[int] | None = None
    labels: list[int] | None = None

    def merge(self, other: "EvalTotals") -> "EvalTotals":
        preds = None if self.predictions is None and other.predictions is None else (
            (self.predictions or []) + (other.predictions or []))
        labels = None if self.labels is None and other.labels is None else ((self.labels or []) + (other.labels or []))
        return EvalTotals(self.loss_sum + other.loss_sum, self.count + other.count, preds, labels)


@runtime_checkable
class Task(Protocol):
    """What every task provides. See ray_s2p/tasks/__init__.py for the registry."""

    def build_model(self) -> torch.nn.Module:
        """The initial model, identical on every replica (seeded from the run seed)."""

    def trainable_names(self, model: torch.nn.Module) -> list[str]:
        """Names (from model.named_parameters()) of the parameters the optimizer moves."""

    def train_batch(self, step: int, shard: int, num_shards: int) -> Batch:
        """The training batch for one (step, shard); a pure function of its arguments and the seed."""

    def prepare(self, model: torch.nn.Module, batch: Batch, trainable: list[str]) -> Batch:
        """Once per batch, before the probes: may run the frozen prefix of the network (the part no
        trainable parameter touches) and return a batch holding its outputs, so that ``loss`` only
        runs the rest (feature reuse). Returning ``batch`` unchanged is always correct."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss of the model on a (prepared) batch (a 0-dim tensor)."""

    def eval_batches(self, shard: int, num_shards: int) -> Iterator[Batch]:
        """This shard's part of the held-out set."""

    def eval_totals(self, model: torch.nn.Module, batch: Batch) -> EvalTotals:
        """Loss sum, count and (for classification) predictions and labels of one eval batch."""

    def save_final(self, model: torch.nn.Module, directory: Path) -> None:
        """Write the trained model to ``directory`` in its native format."""
