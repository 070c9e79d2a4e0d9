"""Sequence classification with a transformers encoder and a classification head.

Models (``task.model``): ``minilm`` (bundled all-MiniLM-L6-v2 with a new
``num_labels`` head), ``tiny-bert`` (random, ``tiny_layers`` x ``tiny_width``), or a
hub name / local folder loadable by ``AutoModelForSequenceClassification``.

Batch keys: ``input_ids`` (B, T) and ``attention_mask`` (B, T) int64, right padded
and cut to the batch's longest example; ``labels`` (B,) int64; ``index`` (B,) the
examples' ids. ``prepare`` may add ``features`` (``feature_reuse.PrefixFeatures``).

Loss: mean cross-entropy of the logits (computed in fp32 even under autocast).
"""

from __future__ import annotations

import torch

from ..config import TaskConfig
from ..zo.noise import mix_seed
from .anatomy import Anatomy, hf_anatomy
from .base import Batch
from .classifier import LogitsClassifier
from .errors import TaskError, check_options
from .feature_reuse import replay
from .hf_models import load_pretrained, tiny_bert
from .hf_task import HFTextTask
from .precision import autocast_context
from .text_encoding import load_text_splits
from .trainable import apply_lora, default_lora_targets

TEXT_OPTIONS = {"tokenizer", "vocab_size", "label_names", "data_seed", "synthetic_size", "synthetic_classes",
                "hub_config", "feature_cache_mb", "cls_attention"}
QUERY_NAMES = ("query", "q_proj", "q_lin")
_INIT, _LORA = 0x1417, 0x10AA


class TextClassificationTask(LogitsClassifier, HFTextTask):
    """``task.name: text_classification`` (see the module docstring)."""

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        check_options(cfg.options, TEXT_OPTIONS, "text_classification")
        self.cfg = cfg
        self.seed = seed
        self.data = load_text_splits(cfg, mode="classify", labelled=True)
        self.num_labels = int(self.data.num_labels or 2)
        self._init_shared()

    # ------------------------------------------------------------------ model
    def build_model(self) -> torch.nn.Module:
        """The classifier, identical on every replica (random parts drawn from the run seed)."""
        cfg = self.cfg
        if cfg.model == "tiny-bert":
            model = tiny_bert(num_labels=self.num_labels, vocab_size=len(self.data.tokenizer),
                              pad_id=int(self.data.tokenizer.pad_token_id), width=cfg.tiny_width,
                              layers=cfg.tiny_layers, max_length=cfg.max_length, seed=mix_seed(self.seed, _INIT))
        else:
            model = load_pretrained("sequence_classification", cfg.model, seed=mix_seed(self.seed, _INIT),
                                    num_labels=self.num_labels, trust_remote_code=cfg.trust_remote_code,
                                    device_map=cfg.device_map)
        if cfg.options.get("cls_attention", "pretrained") == "uniform":
            uniform_last_layer_attention(model, self.anatomy(model))
        elif cfg.options.get("cls_attention", "pretrained") != "pretrained":
            raise TaskError("config field 'task.options.cls_attention': use 'pretrained' or 'uniform'")
        names = self.data.label_names
        if names and len(names) == self.num_labels:
            model.config.id2label = dict(enumerate(names))
            model.config.label2id = {n: i for i, n in enumerate(names)}
        if cfg.trainable == "lora":
            targets = cfg.lora_targets or default_lora_targets(model.config.model_type)
            # The classification head is new (random): it trains alongside the adapters.
            model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=targets,
                               model_type=model.config.model_type, head=hf_anatomy(model, "sequence_classification").head,
                               seed=mix_seed(self.seed, _LORA), last_blocks=cfg.lora_blocks)
        return model.eval()

    # ------------------------------------------------------------------ data
    # ------------------------------------------------------------------ forward
    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, num_labels) fp32 logits, from the cached prefix when the batch has one."""
        with autocast_context(self.cfg.autocast, model):
            if "features" in batch:
                out = replay(batch)
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out.float()



def uniform_last_layer_attention(model: torch.nn.Module, anatomy: Anatomy) -> None:
    """Zero the last block's attention query (weight and bias), so every token, [CLS] included,
    attends uniformly to all unmasked tokens: [CLS] then carries a mean over the sequence.

    Why: encoders trained with mean pooling (sentence-transformers, e.g. all-MiniLM-L6-v2) put the
    sentence meaning in the token average, not in [CLS], while AutoModelForSequenceClassification
    classifies from [CLS]. This expresses mean pooling inside the network's own weights, so the
    saved model still loads and predicts the same with plain transformers.

    Raises:
        TaskError: the last block has no recognisable query projection.
    """
    last = anatomy.blocks[-1]
    queries = [m for n, m in last.named_modules() if n.split(".")[-1] in QUERY_NAMES and hasattr(m, "weight")]
    if not queries:
        raise TaskError("task.options.cls_attention 'uniform': the model's last layer has no query projection "
                        f"named {' / '.join(QUERY_NAMES)}. Fix: leave cls_attention at 'pretrained'")
    with torch.no_grad():
        for q in queries:
            q.weight.zero_()
            if getattr(q, "bias", None) is not None:
                q.bias.zero_()


def build(cfg: TaskConfig, seed: int) -> TextClassificationTask:
    """Factory for the task registry (name ``text_classification``)."""
    return TextClassificationTask(cfg, seed)


__all__ = ["TextClassificationTask", "build"]
