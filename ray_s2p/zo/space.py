"""The direction space of a model under a ``PerturbationConfig``: the one place settings become a
``DirectionSpace``.

The distributed trainer's replicas (distributed/engine.py) and the plain ``ZerothOrderOptimizer`` both
build their space here, so the same words (distribution, table size, rank, noise threads) draw the same
noise in both: a run of the trainer and a plain loop with the same config and seed make the same
directions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import PerturbationConfig
from .directions import DirectionSpace
from .noise import NoiseTable
from .weight_decay import decay_exempt

_TABLES: dict[tuple[int, str], NoiseTable] = {}


def select_parameters(model: torch.nn.Module, names: Sequence[str] | None = None) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Selected parameters in canonical order (``named_parameters`` order, tied ones once).

    Args:
        model: the model.
        names: names to select; None selects every parameter with requires_grad.

    Raises:
        ValueError: a name is not a parameter of the model, or nothing is selected.
    """
    all_named = list(model.named_parameters())
    if names is None:
        chosen = [(n, p) for n, p in all_named if p.requires_grad]
    else:
        wanted = set(names)
        known = {n for n, _ in all_named}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"parameter {missing[0]!r} is not in the model. Fix: check the trainable selection")
        chosen = [(n, p) for n, p in all_named if n in wanted]
    if not chosen:
        raise ValueError("no trainable parameters selected. Fix: check task.trainable / patterns")
    return [n for n, _ in chosen], [p for _, p in chosen]


def noise_table(size: int, device: torch.device) -> NoiseTable:
    """One shared table per (size, device) per process: replicas in one process share it."""
    key = (size, str(device))
    if key not in _TABLES:
        _TABLES[key] = NoiseTable(size, device=device)
    return _TABLES[key]


def noise_threads(requested: int, device: torch.device) -> int:
    """Threads for making noise: on a GPU one (kernels run asynchronously already); on a CPU ``requested``
    (``cluster.noise_threads``), or torch's thread count when that is 0 (a generator call uses one core).
    The count changes only the speed, never a bit of the noise (tests/zo/test_perturbation.py)."""
    if device.type != "cpu":
        return 1
    return requested or max(1, torch.get_num_threads())


def build_space(model: torch.nn.Module, names: Sequence[str] | None, perturbation: PerturbationConfig, *,
                seed: int, weight_decay_exempt: str, threads: int = 0) -> DirectionSpace:
    """The direction space of ``model``'s parameters ``names`` (None: every parameter with requires_grad).

    Args:
        model: the model whose parameters move.
        names: the trainable parameter names, or None.
        perturbation: distribution, noise source, table size, rank and the low-rank interval (docs/config.md).
        seed: the run seed (low-rank factor streams are keyed by it).
        weight_decay_exempt: ``optimizer.weight_decay_exempt`` (which parameters weight decay spares).
        threads: ``cluster.noise_threads`` (0: torch's thread count on a CPU).
    """
    names, params = select_parameters(model, names)
    p = perturbation
    table = noise_table(p.table_size, params[0].device) if p.distribution == "table" else None
    return DirectionSpace(names, params, p.distribution, table, noise_threads(threads, params[0].device),
                          rank=p.rank, lowrank_interval=p.lowrank_interval, run_seed=seed,
                          decay_exempt=decay_exempt(model, names, weight_decay_exempt), noise_source=p.noise)
