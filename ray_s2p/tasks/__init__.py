"""Task registry: ``build_task(cfg, seed)`` by ``task.name`` or a ``module:function`` path.

Built-in tasks (imported lazily: transformers is heavy, so the synthetic task
used by smoke runs starts fast):

- ``text_classification``: encoder + classification head (MiniLM, tiny-bert, HF models).
- ``prompt_classification``: causal LM scored on label words after a prompt (MeZO-style).
- ``causal_lm``: next-token cross-entropy (tiny-gpt2, SmolLM2, HF models).
- ``image_classification``: the project's CNN / ResNet-18 on MNIST-5k, digits.
- ``synthetic``: a tiny MLP on Gaussian blobs (machinery tests).

A user factory is named ``package.module:function``; it is called as
``function(cfg, seed)`` and must return an object implementing ``tasks.base.Task``.
"""

from __future__ import annotations

import dataclasses
import importlib

from ..config import ConfigError, TaskConfig
from .base import Task

# Built-in tasks that make their own model and data (no task.model or task.dataset), in words, and the task
# keys each reads: a run's config.yaml leaves the others out (``unused_keys``), so it does not name a model or
# dataset the run never used. tests/tasks/test_tasks.py checks the list against tasks/synthetic.py.
WITHOUT_MODEL = {"synthetic": "a 2-layer MLP on generated Gaussian blobs"}
KEYS_READ = {"synthetic": ("name", "batch_size", "train_size", "eval_size", "test_size", "split_seed", "eval_split",
                           "num_labels", "trainable", "options")}

# name -> "module:function" (relative to this package); each function is (cfg, seed) -> Task
BUILTIN = {
    "synthetic": ".synthetic:build",
    "text_classification": ".text_classification:build",
    "prompt_classification": ".prompt_classification:build",
    "causal_lm": ".causal_lm:build",
    "image_classification": ".vision:build",
}


def build_task(cfg: TaskConfig, seed: int) -> Task:
    """Build the task named by ``cfg.name``.

    Raises:
        ConfigError: unknown task name or a ``module:function`` path that does not import.
    """
    target = BUILTIN.get(cfg.name)
    if target is None and ":" not in cfg.name:
        raise ConfigError(f"config field 'task.name': unknown task {cfg.name!r}. Fix: use one of "
                          f"{', '.join(sorted(BUILTIN))} or a 'module:function' path to your own factory")
    spec = target or cfg.name
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name, package=__name__ if module_name.startswith(".") else None)
        factory = getattr(module, func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"config field 'task.name': cannot load {spec!r} ({exc}). "
                          f"Fix: give an importable 'module:function'") from exc
    task = factory(cfg, seed)
    if not isinstance(task, Task):  # runtime_checkable: checks the methods exist
        missing = [m for m in ("build_model", "trainable_names", "train_batch", "prepare", "loss", "eval_batches",
                               "eval_totals", "save_final") if not callable(getattr(task, m, None))]
        raise ConfigError(f"config field 'task.name': {spec!r} returned {type(task).__name__}, which lacks "
                          f"{', '.join(missing)}. Fix: implement the ray_s2p.tasks.base.Task protocol")
    return task


def describe(cfg: TaskConfig) -> str:
    """What a run trains, in words: ``minilm on rotten_tomatoes``; for a task without a model or dataset its
    own description, for a ``module:function`` factory its path."""
    if cfg.name in WITHOUT_MODEL:
        return f"the {cfg.name} task ({WITHOUT_MODEL[cfg.name]})"
    if ":" in cfg.name:
        return f"the task from {cfg.name}"
    return f"{cfg.model} on {cfg.dataset}"


def unused_keys(cfg: TaskConfig) -> tuple[str, ...]:
    """The task keys a built-in task without a model never reads (none for the others)."""
    read = KEYS_READ.get(cfg.name)
    return () if read is None else tuple(f.name for f in dataclasses.fields(cfg) if f.name not in read)
