"""``ray-s2p bench hooks``: what the ``hooks`` probe's looked-up embedding rows and merged scopes save.

One engine's model and direction space (the config's; MiniLM and Gaussian directions by default), and four
probers over them: ``per_module`` (a hook pair on every module that owns parameters, each embedding's whole
table copied), ``lookups`` (embeddings make only the rows their batch looks up), ``merged`` (modules merged
into parents within the largest module's memory, zo/hook_scopes.py) and ``both`` (the default). Every round
times one bare forward and then one probe of each prober on the same batch, with a fresh direction per
round; the medians of the rounds are reported, so that the four are compared side by side on a machine
whose speed moves. Two batches: ``text`` (the task's first training batch: real text, a few hundred
distinct ids) and ``uniform`` (the step benchmark's batch, ids drawn uniformly: nearly every id distinct,
the worst case for looked-up rows).

The line holds per batch: ``distinct_ids``, ``forward_s``, per prober ``probe_s`` and ``overhead_s``
(probe - forward), and ``same_loss`` (the four losses of one direction, compared bit for bit); and per
prober ``held_copy_bytes`` (``Prober.held_copy_bytes``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ..distributed.engine import ReplicaEngine, to_device
from ..zo.noise import mix_seed
from ..zo.probes import Prober
from .common import BENCH_SEED, BenchContext, config_essentials, log, synchronize
from .step import fixed_batch

PROBERS = {"per_module": (False, False), "lookups": (True, False), "merged": (False, True), "both": (True, True)}
RADIUS = 1e-3


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_hooks(ctx: BenchContext) -> dict[str, Any]:
    """The ``hooks`` benchmark (see the module docstring for the keys)."""
    config = ctx.local_config().replace({"perturbation.mechanism": "hooks"})
    task = ctx.task()
    engine = ReplicaEngine(config, 0, task=task)
    model, space, device = engine.model, engine.space, engine.device
    probers = {name: Prober(model, space, "hooks", row_lookups=lookups, merge=merge)
               for name, (lookups, merge) in PROBERS.items()}
    rounds = max(ctx.repeats, 1) * 3
    batches = {"text": task.train_batch(1, 0, 1), "uniform": fixed_batch(task, model, config)}
    out: dict[str, Any] = {}
    for label, batch in batches.items():
        prepared = task.prepare(model, to_device(batch, device), engine.trainable)

        def loss_fn(prepared: Any = prepared) -> torch.Tensor:
            return task.loss(model, prepared)
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        losses = {name: prober.loss(loss_fn, mix_seed(BENCH_SEED, 0), RADIUS) for name, prober in probers.items()}
        same = all(torch.equal(v, losses["both"]) for v in losses.values())
        with torch.no_grad():
            loss_fn()  # warm-up
        forward: list[float] = []
        probes: dict[str, list[float]] = {name: [] for name in probers}
        log(f"  {label} batch: {rounds} rounds of a forward and {len(probers)} probes")
        for k in range(1, rounds + 1):
            with torch.no_grad():
                forward.append(_seconds(loss_fn, device))
            for name, prober in probers.items():
                probes[name].append(_seconds(lambda p=prober, k=k: p.loss(loss_fn, mix_seed(BENCH_SEED, k), RADIUS),
                                             device))
        fw = statistics.median(forward)
        out[label] = {"distinct_ids": int(torch.unique(ids).numel()) if isinstance(ids, torch.Tensor) else None,
                      "forward_s": fw, "same_loss": same,
                      "probe_s": {n: statistics.median(t) for n, t in probes.items()},
                      "overhead_s": {n: statistics.median(t) - fw for n, t in probes.items()}}
    return {"config": {**config_essentials(config), "device": str(device)}, "rounds": rounds, "radius": RADIUS,
            "batches": out, "held_copy_bytes": {n: p.held_copy_bytes for n, p in probers.items()}}
