"""Image classification with the project's CNN / ResNet-18 (``ray_s2p.tasks.vision_models``).

Data (``task.dataset``): ``mnist5k`` (1x28x28), ``digits`` (1x8x8), ``synthetic_images``
(1x8x8), or a local table with a label column and either a ``pixels`` list column
or one numeric column per pixel (square single-channel images unless
``task.options.image_shape`` = [C, H, W]). Pixels are standardised with the
mean and standard deviation of the training split (one scalar each, so the
normalisation is a function of the split, ``task.split_seed``, not of the run seed).

Models (``task.model``): ``cnn``, ``resnet18`` (base width ``task.tiny_width``; 64
is the standard ResNet-18), or a folder written by ``save_final``. GroupNorm
throughout (see vision_models for why not BatchNorm), models kept in eval().

Batch keys: ``pixels`` (B, C, H, W) float32, ``labels`` (B,) int64, ``index`` (B,).
"""

from __future__ import annotations

import copy
import json
import math
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import TaskConfig
from ..data.batching import Examples, eval_positions, split_rows, train_positions
from ..data.sources import DataError, check_label_range, labels_to_ids, load_source, require_columns
from ..zo.noise import mix_seed
from .anatomy import Anatomy, unwrap
from .base import Batch
from .classifier import LogitsClassifier
from .errors import TaskError, check_options
from .feature_reuse import FeatureCache, prepare_features, replay
from .hf_models import seeded
from .precision import autocast_context, match_weights
from .trainable import LORA_TARGETS, apply_lora, select_trainable
from .vision_models import ARCHITECTURES, build_vision_model

VISION_OPTIONS = {"label_names", "data_seed", "synthetic_size", "synthetic_classes", "hub_config", "feature_cache_mb",
                  "image_shape"}
SPEC_FILE = "vision_model.json"
_INIT, _LORA = 0x1A9E, 0x1A10


class ImageClassificationTask(LogitsClassifier):
    """``task.name: image_classification`` (see the module docstring)."""

    # Examples one data shard draws per train batch; None means task.batch_size. The replica engine sets
    # a share of task.batch_size under cluster.batch_scaling: strong (eval batches keep task.batch_size).
    train_batch_size: int | None = None

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        check_options(cfg.options, VISION_OPTIONS, "image_classification")
        if cfg.model not in ARCHITECTURES and not (Path(cfg.model).expanduser() / SPEC_FILE).is_file():
            raise TaskError(f"config field 'task.model': {cfg.model!r} is not a vision model. Fix: use "
                            f"{' or '.join(ARCHITECTURES)}, or a folder written by save_final")
        self.cfg = cfg
        self.seed = seed
        data = load_source(cfg.dataset, cfg.options)
        require_columns(data.rows, [cfg.label_column], cfg.dataset)
        pixels = _pixel_matrix(data.rows, cfg.label_column, cfg.dataset)
        shape = tuple(cfg.options.get("image_shape") or data.image_shape or _square(pixels.shape[1], cfg.dataset))
        if math.prod(shape) != pixels.shape[1]:
            raise DataError(f"task.options.image_shape {list(shape)} has {math.prod(shape)} values but the data has "
                            f"{pixels.shape[1]} pixel columns. Fix: give [channels, height, width] matching the data")
        given = cfg.options.get("label_names")
        self.label_names = tuple(given) if given else data.label_names
        labels = labels_to_ids(data.rows[cfg.label_column], cfg.label_column, given)
        self.num_labels = cfg.num_labels or (len(self.label_names) if self.label_names else max(labels) + 1)
        check_label_range(labels, self.num_labels, cfg.label_column)
        # The split comes from task.split_seed, never the run seed: every seed sees the same examples.
        split = split_rows(len(labels), split_seed=cfg.split_seed, eval_size=cfg.eval_size, test_size=cfg.test_size,
                           labels=labels, k_shot=cfg.k_shot, train_size=cfg.train_size)
        evaluated = split.evaluated(cfg.eval_split)
        images = torch.from_numpy(pixels).reshape(-1, *shape)
        train_images = images[split.train]
        # One scalar mean/std from the training split: fixed by the split, no validation or test leakage.
        self.mean = float(train_images.mean())
        self.std = float(train_images.std()) or 1.0
        label_tensor = torch.as_tensor(labels, dtype=torch.long)
        self.image_shape = tuple(int(s) for s in shape)
        self.train = Examples({"pixels": (train_images - self.mean) / self.std,
                               "labels": label_tensor[split.train]}, split.train)
        self.eval = Examples({"pixels": (images[evaluated] - self.mean) / self.std,
                              "labels": label_tensor[evaluated]}, evaluated)
        self.cache = FeatureCache(int(cfg.options.get("feature_cache_mb", 256)) << 20)
        self._anatomies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ model
    def _spec(self) -> dict:
        return {"arch": self.cfg.model, "in_channels": self.image_shape[0], "num_classes": self.num_labels,
                "width": self.cfg.tiny_width, "image_shape": list(self.image_shape), "mean": self.mean,
                "std": self.std, "label_names": list(self.label_names) if self.label_names else None}

    def build_model(self) -> torch.nn.Module:
        """The network, identical on every replica (initialised from the run seed)."""
        cfg = self.cfg
        folder = Path(cfg.model).expanduser()
        if (folder / SPEC_FILE).is_file():
            model = load_vision_model(folder)
        else:
            with seeded(mix_seed(self.seed, _INIT)):
                model = build_vision_model(cfg.model, self.image_shape[0], self.num_labels, cfg.tiny_width)
        if cfg.trainable == "lora":
            model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha,
                               targets=cfg.lora_targets or LORA_TARGETS["vision"], model_type="vision",
                               head=(model.head,), seed=mix_seed(self.seed, _LORA))
        return model.eval()

    def anatomy(self, model: torch.nn.Module) -> Anatomy:
        """blocks -> head; the pixels are the entry (nothing to skip before block 0)."""
        found = self._anatomies.get(model)
        if found is None:
            inner = unwrap(model)
            found = self._anatomies[model] = Anatomy((), tuple(inner.blocks), (), (inner.head,),
                                                     entry=lambda batch: (batch["pixels"], (), {}))
        return found

    def trainable_names(self, model: torch.nn.Module) -> list[str]:
        """Parameters selected by ``task.trainable`` (top_k counts blocks; head = fc)."""
        return select_trainable(model, self.anatomy(model), self.cfg.trainable, top_k=self.cfg.top_k,
                                patterns=self.cfg.patterns)

    # ------------------------------------------------------------------ data
    def train_batch(self, step: int, shard: int, num_shards: int) -> Batch:
        """The batch of (step, shard): a pure function of the arguments and the seed."""
        rows = train_positions(len(self.train), self.train_batch_size or self.cfg.batch_size, seed=self.seed,
                               step=step, shard=shard, num_shards=num_shards, reshuffle=self.cfg.reshuffle)
        return self.train.take(rows)

    def eval_batches(self, shard: int, num_shards: int) -> Iterator[Batch]:
        """This shard's part of the eval set, in fixed order."""
        for rows in eval_positions(len(self.eval), self.cfg.batch_size, shard, num_shards):
            yield self.eval.take(rows)

    # ------------------------------------------------------------------ forward
    def prepare(self, model: torch.nn.Module, batch: Batch, trainable: list[str]) -> Batch:
        """Cache the output of the frozen leading blocks (head-only / top_k); pixels in the weights' dtype."""
        pixels = match_weights(batch["pixels"], model)
        if pixels is not batch["pixels"]:  # bf16/fp16 weights (precision.weights)
            batch = {**batch, "pixels": pixels}
        if not self.cfg.feature_reuse:
            return batch
        return prepare_features(model, batch, trainable, self.anatomy(model), self.cache,
                                autocast_context(self.cfg.autocast, model))

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, num_labels) fp32 logits."""
        with autocast_context(self.cfg.autocast, model):
            out = replay(batch) if "features" in batch else model(match_weights(batch["pixels"], model))
        return out.float()

    def save_final(self, model: torch.nn.Module, directory: Path) -> None:
        """``model.safetensors`` (LoRA merged) + ``vision_model.json`` (architecture, normalisation)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(directory / "model.safetensors"))
        (directory / SPEC_FILE).write_text(json.dumps(self._spec(), indent=2))


def load_vision_model(directory: Path) -> torch.nn.Module:
    """Rebuild a model written by ``ImageClassificationTask.save_final`` (eval mode)."""
    spec = json.loads((Path(directory) / SPEC_FILE).read_text())
    with seeded(0):  # the weights are overwritten; seeding only keeps the caller's RNG untouched
        model = build_vision_model(spec["arch"], spec["in_channels"], spec["num_classes"], spec["width"])
    model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    return model.eval()


def _pixel_matrix(rows, label_column: str, source: str) -> np.ndarray:
    """(N, P) float32 pixels from a ``pixels`` list column or every non-label column."""
    if "pixels" in rows.column_names:
        table = rows.with_format("numpy")[:]
        return np.asarray(np.stack(list(table["pixels"])), dtype=np.float32).reshape(len(rows), -1)
    columns = [c for c in rows.column_names if c != label_column]
    if not columns:
        raise DataError(f"data set {source!r} has no pixel columns besides {label_column!r}. Fix: add a 'pixels' "
                        f"column or one numeric column per pixel")
    # One Arrow column per pixel: read as Arrow arrays (1,000x fewer Python objects than the numpy formatter,
    # ~1.4 s -> 0.05 s for MNIST's 784 columns); with_format("arrow") keeps a selection's row order.
    arrow = rows.with_format("arrow")[:]
    try:
        return np.stack([arrow.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in columns], axis=1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"data set {source!r}: pixel columns must be numeric ({exc}). Fix: keep only the label and "
                        f"pixel columns") from exc


def _square(num_pixels: int, source: str) -> tuple[int, int, int]:
    side = math.isqrt(num_pixels)
    if side * side != num_pixels:
        raise DataError(f"data set {source!r}: {num_pixels} pixel columns do not form a square image. Fix: set "
                        f"task.options.image_shape to [channels, height, width]")
    return (1, side, side)


def build(cfg: TaskConfig, seed: int) -> ImageClassificationTask:
    """Factory for the task registry (name ``image_classification``)."""
    return ImageClassificationTask(cfg, seed)
