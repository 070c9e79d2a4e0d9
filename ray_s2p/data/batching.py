"""Deterministic splits and batches: the split a function of the task alone, batches of (seed, step, shard).

Recovery and replay re-ask a replica for the batch of an old step, so a batch
may depend on nothing else: no global RNG, no iterator state. The train order
is a fresh permutation per epoch, drawn from a ``torch.Generator`` seeded with
``mix_seed(seed, TAG, epoch)``. Step k (1-based, the driver's numbering) covers
the global positions ``[(k-1) G, k G)`` with ``G = B * num_shards``, B the
examples one shard draws; shard s takes the slice ``[(k-1) G + s B, (k-1) G + (s+1) B)``.
Position p is example ``perm(epoch = p // n)[p % n]``, so a batch may straddle two
epochs and every example is seen once per epoch whatever the shard count.

B comes from ``shard_batch_size`` (``cluster.batch_scaling``): under weak scaling it is
``task.batch_size``, so a group's batch G grows with its shards; under strong scaling it
is ``task.batch_size / num_shards``, so G is ``task.batch_size`` and the shards of step k
together draw exactly the batch one replica draws at step k.

The train / validation / test split (``split_rows``) is drawn from ``task.split_seed``
alone, so every run seed sees the same examples; the run seed orders the batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..config import ConfigError
from ..zo.noise import mix_seed
from .sources import DataError

_SPLIT, _EVAL, _EPOCH = 0x5B1, 0xE7A1, 0xE90C


@dataclass(frozen=True)
class RowSplit:
    """Row numbers of the train, validation and test examples.

    Attributes:
        train: rows of the source used for training, in the split seed's order.
        eval: rows of the validation examples (of ``held_out`` when the source has one, else of the source).
        test: rows of the test examples (same source as ``eval``, disjoint from it); empty without a test split.
        eval_from_held_out: whether ``eval`` and ``test`` index the predefined held-out split.
    """

    train: torch.Tensor
    eval: torch.Tensor
    test: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    eval_from_held_out: bool = False

    def evaluated(self, split: str) -> torch.Tensor:
        """The rows a run evaluates: ``eval`` for "validation", ``test`` for "test" (``task.eval_split``)."""
        if split not in ("validation", "test"):
            raise ValueError(f"unknown split {split!r}. Fix: use validation or test")
        return self.test if split == "test" else self.eval


def seeded_permutation(n: int, *seed_parts: int) -> torch.Tensor:
    """A permutation of range(n) from a private generator seeded with ``mix_seed(*seed_parts)``."""
    gen = torch.Generator().manual_seed(mix_seed(*seed_parts))
    return torch.randperm(n, generator=gen)


def split_rows(num_rows: int, *, split_seed: int, eval_size: int, test_size: int = 0,
               labels: Sequence[int] | None = None, k_shot: int | None = None, train_size: int | None = None,
               held_out_rows: int | None = None) -> RowSplit:
    """Split rows into train, validation and test, then apply k-shot sampling and the train-size cap.

    The split is a function of ``split_seed`` (``task.split_seed``) and the sizes only, never of
    the run seed: runs with different seeds train and evaluate on the same examples, and the seed
    changes only initialisation, directions and batch order. Without a held-out split the validation
    rows are the first ``eval_size`` of a seeded permutation, the test rows the next ``test_size``,
    and the rest form the train pool (disjoint by construction). With a held-out split (hub data
    sets that ship one) validation and test are taken the same way from a permutation of it. With
    ``k_shot`` the train set keeps the first k rows of each class in the pool's seeded order
    (MeZO's k-shot setting: 16 or 512 per class); ``train_size`` then keeps the first
    ``train_size`` of those. With ``test_size = 0`` the train and validation rows are those the
    split gave before test splits existed, for a run seed equal to ``split_seed``.

    Args:
        num_rows: rows in the source.
        split_seed: the task's split seed.
        eval_size: validation examples wanted (fewer if the data is smaller).
        test_size: test examples wanted (fewer if the data is smaller).
        labels: label id per source row (needed for ``k_shot``).
        k_shot: examples per class, or None for all.
        train_size: cap on the number of train examples, or None.
        held_out_rows: size of a predefined held-out split, or None to carve validation and test out of the rows.

    Raises:
        DataError: no rows left for training.
    """
    pool = seeded_permutation(num_rows, split_seed, _SPLIT)
    held = eval_size + test_size
    if held_out_rows is not None:
        order = seeded_permutation(held_out_rows, split_seed, _EVAL)
        eval_rows, test_rows = order[:eval_size], order[eval_size:held]
    else:
        eval_rows, test_rows, pool = pool[:eval_size], pool[eval_size:held], pool[held:]
    if pool.numel() == 0:
        raise DataError(f"task.eval_size={eval_size} and task.test_size={test_size} leave no training rows out "
                        f"of {num_rows}. Fix: lower them below {num_rows} together")
    if k_shot is not None:
        if labels is None:
            raise DataError("task.k_shot needs class labels, and this task has none. Fix: set task.k_shot to null")
        label_of = torch.as_tensor(list(labels), dtype=torch.long)[pool]
        keep = torch.zeros(pool.numel(), dtype=torch.bool)
        for cls in torch.unique(label_of).tolist():
            where = torch.nonzero(label_of == cls).flatten()
            if where.numel() < k_shot:
                warnings.warn(f"task.k_shot={k_shot}: class {cls} has only {where.numel()} training rows; using all",
                              stacklevel=2)
            keep[where[:k_shot]] = True
        pool = pool[keep]
    if train_size is not None:
        pool = pool[:train_size]
    return RowSplit(pool, eval_rows, test_rows, held_out_rows is not None)


def train_positions(num_examples: int, batch_size: int, *, seed: int, step: int, shard: int,
                    num_shards: int, reshuffle: bool = True) -> torch.Tensor:
    """Positions (into the train set) of the batch of one (step, shard); see the module docstring.

    With ``reshuffle`` false every epoch uses the first epoch's permutation, so the
    same batches come back each epoch (and cached frozen-prefix features are hit).

    Raises:
        ValueError: an empty train set or a shard outside 0..num_shards-1.
    """
    if num_examples <= 0:
        raise DataError("the train set is empty. Fix: check task.k_shot / task.train_size / the data set")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    start = (step - 1) * batch_size * num_shards + shard * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = torch.div(positions, num_examples, rounding_mode="floor")
    within = positions - epochs * num_examples
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():  # one or two epochs unless the batch exceeds the data
        mask = epochs == epoch
        out[mask] = seeded_permutation(num_examples, seed, _EPOCH, epoch if reshuffle else 0)[within[mask]]
    return out


def shard_batch_size(batch_size: int, shards: int, scaling: str) -> int:
    """Examples one data shard draws per step under ``cluster.batch_scaling``.

    ``weak``: every shard draws ``batch_size`` (``task.batch_size``). ``strong``: ``batch_size`` is the
    group's batch, split evenly among its ``shards``, so that ``train_positions`` gives shard s of step k
    the positions ``[(k-1) batch_size + s b, (k-1) batch_size + (s+1) b)`` with ``b = batch_size / shards``:
    together exactly the batch a single replica draws at step k.

    Raises:
        ValueError: an unknown scaling, or ``strong`` with ``batch_size`` not divisible by ``shards``
            (``RunConfig`` refuses such a config before any replica starts).
    """
    if scaling == "weak":
        return batch_size
    if scaling != "strong":
        raise ConfigError(f"cluster.batch_scaling {scaling!r} is unknown. Fix: use weak or strong")
    if shards < 1 or batch_size % shards:
        raise ConfigError(f"cluster.batch_scaling strong: task.batch_size {batch_size} does not split evenly among "
                         f"{shards} data shards. Fix: use a task.batch_size divisible by the shards per group, or weak")
    return batch_size // shards


def eval_positions(num_examples: int, batch_size: int, shard: int, num_shards: int) -> list[torch.Tensor]:
    """This shard's eval batches: chunks of ``batch_size`` in order, chunk i going to shard i mod num_shards."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    chunks = torch.arange(num_examples).split(batch_size)
    return [chunk for i, chunk in enumerate(chunks) if i % num_shards == shard]


@dataclass(frozen=True)
class Examples:
    """Encoded examples: tensors sharing their first dimension, plus a unique id per example.

    Attributes:
        tensors: e.g. input_ids (N, T), attention_mask (N, T), labels (N,) or pixels (N, C, H, W).
        ids: (N,) ids unique across the train and eval sets (the feature-reuse cache key).
        seq_keys: tensors whose dim 1 is the token axis; a batch is cut to its longest example.
    """

    tensors: dict[str, torch.Tensor]
    ids: torch.Tensor
    seq_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.ids.numel())

    def take(self, positions: torch.Tensor) -> dict[str, Any]:
        """The batch at ``positions``: every tensor indexed, ``index`` = the examples' ids.

        Trailing columns that are padding for every example are cut (right padding), so
        a batch of short reviews costs its own length, not ``max_length``.
        """
        batch: dict[str, Any] = {key: value[positions] for key, value in self.tensors.items()}
        if self.seq_keys and "attention_mask" in batch:
            length = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
            for key in self.seq_keys:
                batch[key] = batch[key][:, :length]
        batch["index"] = self.ids[positions]
        return batch
