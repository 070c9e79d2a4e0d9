"""Task registry: ``build_task(cfg, seed)`` by ``task.name`` or a ``module:function`` path.

Built-in tasks are imported lazily (transformers is heavy), so the synthetic
task used by smoke runs starts fast.
"""

from __future__ import annotations

import importlib

from ..config import ConfigError, TaskConfig
from .base import Task

# name -> "module:function" (relative to this package); each function is (cfg, seed) -> Task
BUILTIN = {
    "synthetic": ".synthetic:build",
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
    return factory(cfg, seed)
