"""A randomly initialised Llama-style causal LM on random tokens: a model-sized task with no asset.

``ray-s2p bench driver`` (driver.py) trains it on Ray replicas to show that the
driver's memory and traffic do not grow with the model. The spec defaults to
``LLAMA_1B``, the synthetic ~1 B model of jobs/gpu_check_plan.py (16 layers of
width 2048, 0.95 B parameters); ``task.options`` may override any of its keys and
set ``dtype`` (``fp32``, ``bf16``, ``fp16``; default ``bf16``): the model is built in
that dtype directly, so a 1 B model never holds a 4 GB fp32 copy.

Batches: ``task.batch_size`` sequences of ``task.max_length`` random token ids per
(step, shard), drawn from a generator seeded by (seed, step, shard); under
``cluster.batch_scaling: strong`` shard s of N takes its N-th of the step's shard-0
batch instead, so the shards together hold what one replica draws. The loss is the
mean next-token cross-entropy from fp32 logits. ``task.eval_size`` sequences are held out.
Named in a config as ``task.name: ray_s2p.bench.random_llama:build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import ConfigError, TaskConfig
from ..tasks.base import Batch, EvalTotals
from ..tasks.hf_models import seeded
from ..zo.noise import mix_seed

# The same spec as LLAMA_1B / LLAMA_TINY in jobs/gpu_check_plan.py (tests/bench checks they agree).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_INIT, _TRAIN, _EVAL = 0x11A, 0x70C, 0xE7A


class RandomLlamaTask:
    """Next-token prediction of random tokens by a random LlamaForCausalLM (every parameter trainable).

    Args:
        cfg: the task config (``batch_size``, ``max_length``, ``eval_size``, ``options``).
        seed: the run seed (model init and batches).

    Raises:
        ValueError: an unknown option or dtype, named with the fix.
    """

    # Examples one data shard draws per train batch; None means task.batch_size. The replica engine sets
    # a share of task.batch_size under cluster.batch_scaling: strong (eval batches keep task.batch_size).
    train_batch_size: int | None = None

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        opts = dict(cfg.options)
        unknown = set(opts) - set(LLAMA_1B) - {"dtype"}
        if unknown:
            raise ConfigError(f"task.options: unknown key {sorted(unknown)[0]!r} for the random Llama task. "
                             f"Fix: use dtype or any of {', '.join(LLAMA_1B)}")
        dtype = str(opts.pop("dtype", "bf16"))
        if dtype not in DTYPES:
            raise ConfigError(f"task.options.dtype: unknown value {dtype!r}. Fix: use one of {', '.join(DTYPES)}")
        self.cfg = cfg
        self.seed = seed
        self.dtype = DTYPES[dtype]
        self.spec = {**LLAMA_1B, **{k: int(v) for k, v in opts.items()}}

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**self.spec, tie_word_embeddings=False,
                             max_position_embeddings=max(2048, self.cfg.max_length))
        with seeded(mix_seed(self.seed, _INIT)):  # the init draws from the global RNG: forked, then restored
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        return model.eval()

    def trainable_names(self, model: torch.nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]

    def _tokens(self, count: int, *salt: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, *salt))
        return torch.randint(1, self.spec["vocab_size"], (count, self.cfg.max_length), generator=gen)

    def train_batch(self, step: int, shard: int, num_shards: int) -> Batch:
        if self.train_batch_size is None:  # weak scaling: every shard its own task.batch_size sequences
            return {"input_ids": self._tokens(self.cfg.batch_size, _TRAIN, step, shard)}
        # Strong scaling: this shard's slice of the batch one replica (shard 0 of 1) draws at this step.
        b = self.train_batch_size
        return {"input_ids": self._tokens(self.cfg.batch_size, _TRAIN, step, 0)[shard * b:(shard + 1) * b]}

    def prepare(self, model: torch.nn.Module, batch: Batch, trainable: list[str]) -> Batch:
        return batch

    def _token_losses(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """(B * (T-1),) cross-entropy of each next token, from fp32 logits."""
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self._token_losses(model, batch["input_ids"]).mean()

    def eval_batches(self, shard: int, num_shards: int) -> Iterator[Batch]:
        ids = self._tokens(self.cfg.eval_size, _EVAL)[shard::num_shards]
        for i in range(0, ids.shape[0], self.cfg.batch_size):
            yield {"input_ids": ids[i:i + self.cfg.batch_size]}

    def eval_totals(self, model: torch.nn.Module, batch: Batch) -> EvalTotals:
        losses = self._token_losses(model, batch["input_ids"])
        return EvalTotals(float(losses.sum()), int(losses.numel()))

    def save_final(self, model: torch.nn.Module, directory: Path) -> None:
        """``save_pretrained`` (safetensors): loads with plain transformers."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)


def build(cfg: TaskConfig, seed: int) -> RandomLlamaTask:
    """Task factory (``task.name: ray_s2p.bench.random_llama:build``)."""
    return RandomLlamaTask(cfg, seed)
