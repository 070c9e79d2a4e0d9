"""Generative fine-tuning: next-token cross-entropy of a causal LM on a text column.

Models (``task.model``): ``tiny-gpt2`` (random), ``smollm2`` (bundled GGUF,
converted once, see ``hf_models``), or a hub name / local folder for
``AutoModelForCausalLM``. ``causal_lm_from_config`` is shared with prompt classification.

Batch keys: ``input_ids`` (B, T), ``attention_mask`` (B, T) (each text ends with
the end token, then right padding), ``index`` (B,); ``prepare`` may add
``features``. The loss is the mean over real target tokens; ``eval_totals`` gives
the token-summed loss and the token count (perplexity = exp(loss_sum / count)).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..config import TaskConfig
from ..zo.noise import mix_seed
from .base import Batch, EvalTotals
from .errors import check_options
from .feature_reuse import replay, trainable_by_flags
from .hf_models import load_pretrained, tiny_gpt2, untie_output_embeddings
from .hf_task import HFTextTask
from .precision import autocast_context
from .text_classification import TEXT_OPTIONS
from .text_encoding import end_token_id, load_text_splits
from .trainable import apply_lora, default_lora_targets

_INIT, _LORA = 0xCA05, 0xCA10


def build_causal_lm(*, model: str, seed: int, tokenizer: Any, trainable: str, tiny_width: int, tiny_layers: int,
                    max_length: int, lora_r: int, lora_alpha: int, lora_targets: tuple[str, ...],
                    trust_remote_code: bool = False, device_map: str | None = None,
                    untie_head: bool = True, lora_blocks: int = 0) -> torch.nn.Module:
    """A causal LM ready for zeroth-order tuning, identical on every replica.

    For ``head`` and ``top_k`` a tied lm_head is untied (a copy of the embeddings) when
    ``untie_head``, so training the head does not move the input embeddings and the prefix
    can be cached; a task that scores with a head of its own (prompt classification's label
    words) keeps the model as loaded. For ``lora`` adapters are added (no head training: the
    LM head is pretrained).
    """
    if model == "tiny-gpt2":
        end_id = end_token_id(tokenizer)
        lm = tiny_gpt2(vocab_size=len(tokenizer), pad_id=int(tokenizer.pad_token_id),
                       eos_id=int(end_id if end_id is not None else tokenizer.pad_token_id), width=tiny_width,
                       layers=tiny_layers, max_length=max_length, seed=mix_seed(seed, _INIT))
    else:
        lm = load_pretrained("causal_lm", model, seed=mix_seed(seed, _INIT), trust_remote_code=trust_remote_code,
                             device_map=device_map)
    if untie_head and trainable in ("head", "top_k"):
        untie_output_embeddings(lm)
    if trainable == "lora":
        model_type = lm.config.model_type
        lm = apply_lora(lm, r=lora_r, alpha=lora_alpha, targets=lora_targets or default_lora_targets(model_type),
                        model_type=model_type, seed=mix_seed(seed, _LORA), last_blocks=lora_blocks)
    return lm.eval()


def causal_lm_from_config(cfg: TaskConfig, seed: int, tokenizer: Any, *, untie_head: bool = True) -> torch.nn.Module:
    """``build_causal_lm`` with the task config's model, trainable, tiny-model, LoRA and placement fields."""
    return build_causal_lm(model=cfg.model, seed=seed, tokenizer=tokenizer, trainable=cfg.trainable,
                           tiny_width=cfg.tiny_width, tiny_layers=cfg.tiny_layers, max_length=cfg.max_length,
                           lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                           trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map, untie_head=untie_head,
                           lora_blocks=cfg.lora_blocks)


class CausalLMTask(HFTextTask):
    """``task.name: causal_lm`` (see the module docstring)."""

    ANATOMY_KIND = "causal_lm"

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        check_options(cfg.options, TEXT_OPTIONS, "causal_lm")
        self.cfg = cfg
        self.seed = seed
        self.data = load_text_splits(cfg, mode="lm", labelled=False)
        self._init_shared()

    def build_model(self) -> torch.nn.Module:
        """The LM (see ``build_causal_lm``)."""
        return causal_lm_from_config(self.cfg, self.seed, self.data.tokenizer)

    def _token_losses(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position next-token losses (B, T-1) and the mask of real targets."""
        with autocast_context(self.cfg.autocast, model):
            if "features" in batch:
                logits = replay(batch)
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # position t predicts token t+1
        targets = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].bool()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return losses.view_as(targets) * mask, mask

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's real tokens."""
        losses, mask = self._token_losses(model, batch)
        return losses.sum() / mask.sum().clamp(min=1)

    def eval_totals(self, model: torch.nn.Module, batch: Batch) -> EvalTotals:
        """Token-summed loss and token count (no predictions: not a classification task)."""
        batch = self.prepare(model, batch, trainable_by_flags(model)) if "features" not in batch else batch
        losses, mask = self._token_losses(model, batch)
        return EvalTotals(float(losses.sum()), int(mask.sum()))



def build(cfg: TaskConfig, seed: int) -> CausalLMTask:
    """Factory for the task registry (name ``causal_lm``)."""
    return CausalLMTask(cfg, seed)
