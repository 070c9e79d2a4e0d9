"""A tiny classifier on generated Gaussian blobs: the smoke-test and unit-test task.

Needs no asset and no tokenizer; a step takes a millisecond or two, so tests
of the trainer's machinery (recovery, resume, replay, modes) run fast.
``task.options`` may set ``features`` (default 16), ``hidden`` (32),
``train_examples`` (2048) and ``noise`` (1.0). The blobs are drawn from
``task.split_seed``: training, validation (``eval_size``) and test (``test_size``)
examples in that order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ..config import TaskConfig
from ..zo.noise import mix_seed
from .base import Batch, EvalTotals
from .errors import TaskError
from .precision import match_weights


class BlobsTask:
    """num_labels Gaussian blobs in ``features`` dimensions, classified by a 2-layer MLP."""

    # Examples one data shard draws per train batch; None means task.batch_size. The replica engine sets
    # a share of task.batch_size under cluster.batch_scaling: strong (eval batches keep task.batch_size).
    train_batch_size: int | None = None

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        opts = dict(cfg.options)
        unknown = set(opts) - {"features", "hidden", "train_examples", "noise"}
        if unknown:
            raise TaskError(f"task.options: unknown key {sorted(unknown)[0]!r} for the synthetic task. "
                             f"Fix: use features, hidden, train_examples or noise")
        self.cfg = cfg
        self.seed = seed
        self.classes = cfg.num_labels or 2
        self.features = int(opts.get("features", 16))
        self.hidden = int(opts.get("hidden", 32))
        n_train = int(cfg.train_size or opts.get("train_examples", 2048))
        # The data and its train / validation / test split come from task.split_seed, never the run seed:
        # every seed sees the same examples (the seed draws the weights and the batch order).
        gen = torch.Generator().manual_seed(mix_seed(cfg.split_seed, 0xB10B))
        centers = torch.randn(self.classes, self.features, generator=gen) * 1.5
        total = n_train + cfg.eval_size + cfg.test_size
        labels = torch.randint(0, self.classes, (total,), generator=gen)
        x = centers[labels] + float(opts.get("noise", 1.0)) * torch.randn(total, self.features, generator=gen)
        self.train_x, self.train_y = x[:n_train], labels[:n_train]
        held = slice(n_train, n_train + cfg.eval_size) if cfg.eval_split == "validation" else slice(
            n_train + cfg.eval_size, total)
        self.eval_x, self.eval_y = x[held], labels[held]

    def build_model(self) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 0x30DE1))
        model = torch.nn.Sequential(torch.nn.Linear(self.features, self.hidden), torch.nn.Tanh(),
                                    torch.nn.Linear(self.hidden, self.classes))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1]) ** 0.5)
        return model

    def trainable_names(self, model: torch.nn.Module) -> list[str]:
        names = [n for n, _ in model.named_parameters()]
        if self.cfg.trainable == "head":
            names = [n for n in names if n.startswith("2.")]
        elif self.cfg.trainable == "bitfit":
            names = [n for n in names if n.endswith("bias")]
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        return names

    def train_batch(self, step: int, shard: int, num_shards: int) -> Batch:
        # With b = B / num_shards (strong scaling) the epoch length n // (b * num_shards) and the start
        # pos * B + shard * b are those of one replica, so the shards split its batch exactly.
        b = self.train_batch_size or self.cfg.batch_size
        n = self.train_x.shape[0]
        per_epoch = max(1, n // (b * num_shards))
        epoch, pos = divmod(step - 1, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, 0xE0C, epoch)))
        start = (pos * num_shards + shard) * b
        idx = perm[start:start + b]
        return {"x": self.train_x[idx], "y": self.train_y[idx], "index": idx}

    def prepare(self, model: torch.nn.Module, batch: Batch, trainable: list[str]) -> Batch:
        return batch

    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, classes) fp32 logits; the input is cast to the weights' dtype (precision.weights)."""
        # The loss is computed from fp32 logits: a bf16 loss (ulp 2^-8 at 0.7) would swallow the
        # difference f(x + rho z) - f(x - rho z) the two-point rules divide by 2 rho.
        return model(match_weights(x, model)).float()

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(model, batch["x"]), batch["y"])

    def eval_batches(self, shard: int, num_shards: int) -> Iterator[Batch]:
        idx = torch.arange(shard, self.eval_x.shape[0], num_shards)
        for i in range(0, idx.numel(), 256):
            part = idx[i:i + 256]
            yield {"x": self.eval_x[part], "y": self.eval_y[part]}

    def eval_totals(self, model: torch.nn.Module, batch: Batch) -> EvalTotals:
        logits = self.logits(model, batch["x"])
        loss = torch.nn.functional.cross_entropy(logits, batch["y"], reduction="sum")
        return EvalTotals(float(loss), int(batch["y"].numel()), logits.argmax(-1).tolist(), batch["y"].tolist())

    def save_final(self, model: torch.nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(directory / "model.safetensors"))


def build(cfg: TaskConfig, seed: int) -> BlobsTask:
    """Factory used by the task registry (name ``synthetic``)."""
    return BlobsTask(cfg, seed)
