"""What the Hugging Face text tasks share: data slicing, parameter selection, feature reuse, saving.

``HFTextTask`` holds the parts that are the same for sequence classification,
prompt classification and causal-LM loss; each subclass says how its model is
cut into stages (``ANATOMY_KIND`` / ``anatomy_select``) and how logits and loss
are formed. Classifiers add ``classifier.LogitsClassifier``.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch

from ..config import TaskConfig
from ..data.batching import eval_positions, train_positions
from .anatomy import Anatomy, hf_anatomy
from .base import Batch
from .feature_reuse import FeatureCache, prepare_features
from .hf_models import save_hf_model
from .precision import autocast_context
from .trainable import select_trainable


class HFTextTask:
    """Shared methods of the text tasks (``self.cfg``, ``self.seed``, ``self.data`` set by the subclass)."""

    ANATOMY_KIND: ClassVar[str] = "sequence_classification"
    anatomy_select: ClassVar[Callable | None] = None
    cfg: TaskConfig
    seed: int
    # Examples one data shard draws per train batch; None means task.batch_size. The replica engine sets
    # a share of task.batch_size under cluster.batch_scaling: strong (eval batches keep task.batch_size).
    train_batch_size: int | None = None

    def _init_shared(self) -> None:
        self.cache = FeatureCache(int(self.cfg.options.get("feature_cache_mb", 256)) << 20)
        self._anatomies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def anatomy(self, model: torch.nn.Module) -> Anatomy:
        """The model's chain of stages, computed once per model object."""
        found = self._anatomies.get(model)
        if found is None:
            select = type(self).anatomy_select
            kwargs = {"select": select} if select is not None else {}
            head = self.scoring_head(model)
            if head is not None:
                kwargs["head"] = head
            found = self._anatomies[model] = hf_anatomy(model, self.ANATOMY_KIND, **kwargs)
        return found

    def scoring_head(self, model: torch.nn.Module) -> tuple[torch.nn.Module, ...] | None:
        """The modules the loss scores with, when not the model's own head (None: its own)."""
        return None

    def trainable_names(self, model: torch.nn.Module) -> list[str]:
        """Parameters selected by ``task.trainable``; the others get requires_grad=False."""
        return select_trainable(model, self.anatomy(model), self.cfg.trainable, top_k=self.cfg.top_k,
                                patterns=self.cfg.patterns)

    def train_batch(self, step: int, shard: int, num_shards: int) -> Batch:
        """The batch of (step, shard): a pure function of the arguments and the seed."""
        rows = train_positions(len(self.data.train), self.train_batch_size or self.cfg.batch_size, seed=self.seed,
                               step=step, shard=shard, num_shards=num_shards, reshuffle=self.cfg.reshuffle)
        return self.data.train.take(rows)

    def eval_batches(self, shard: int, num_shards: int) -> Iterator[Batch]:
        """This shard's part of the eval set, in fixed order."""
        for rows in eval_positions(len(self.data.eval), self.cfg.batch_size, shard, num_shards):
            yield self.data.eval.take(rows)

    def prepare(self, model: torch.nn.Module, batch: Batch, trainable: list[str]) -> Batch:
        """Cache the frozen prefix's output (feature reuse) when ``task.feature_reuse`` allows."""
        if not self.cfg.feature_reuse:
            return batch
        return prepare_features(model, batch, trainable, self.anatomy(model), self.cache,
                                autocast_context(self.cfg.autocast, model))

    def save_final(self, model: torch.nn.Module, directory: Path) -> None:
        """save_pretrained (LoRA merged) + tokenizer: loads with the matching transformers Auto class."""
        save_hf_model(model, self.data.tokenizer, Path(directory))
