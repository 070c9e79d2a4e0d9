"""Synthetic tasks with injected faults, loaded by replicas through task.name = "fault_tasks:<factory>".

Faults fire once per run: a marker file under ``task.options["marker_dir"]``
records that the fault happened, so the replacement replica behaves normally.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from ray_s2p.config import TaskConfig
from ray_s2p.tasks.synthetic import BlobsTask


def _split(cfg: TaskConfig) -> tuple[TaskConfig, dict]:
    opts = dict(cfg.options)
    fault = {k: opts.pop(k) for k in ("marker_dir", "at_step", "replica", "kind") if k in opts}
    from dataclasses import replace
    return replace(cfg, options=opts), fault


class FaultyBlobs(BlobsTask):
    """Blobs task that, once, at ``at_step`` on Ray replica ``replica``, hangs, dies or corrupts its parameters.

    ``corrupt`` changes the parameters before the step's probes (so the step's losses are wrong too);
    ``corrupt_at_eval`` changes them while the replica evaluates after step ``at_step``, when no probe of that
    step is left to see them: only the digest check can.
    """

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        clean, self.fault = _split(cfg)
        super().__init__(clean, seed)
        self.model_ref: torch.nn.Module | None = None
        self.last_step = 0  # the last step a training batch was asked for

    def eval_totals(self, model, batch):
        totals = super().eval_totals(model, batch)
        if self.fault.get("kind") == "corrupt_at_eval" and self.last_step == int(self.fault["at_step"]) \
                and os.environ.get("RAY_S2P_REPLICA") == str(self.fault.get("replica", 1)):
            marker = Path(self.fault["marker_dir"]) / "fired-corrupt_at_eval"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)
        return totals

    def build_model(self) -> torch.nn.Module:
        self.model_ref = super().build_model()
        return self.model_ref

    def loss(self, model, batch):
        value = super().loss(model, batch)
        return value * float("nan") if batch.get("poison") else value

    def train_batch(self, step: int, shard: int, num_shards: int):
        self.last_step = step
        kind = self.fault.get("kind")
        if kind in ("nan_once", "nan_forever"):  # non-finite losses at one step / from a step on
            at = int(self.fault["at_step"])
            batch = super().train_batch(step, shard, num_shards)
            batch["poison"] = step == at if kind == "nan_once" else step >= at
            return batch
        if self.fault.get("kind") == "slow":  # gives a test time to kill the driver mid-run
            time.sleep(float(self.fault.get("at_step", 0)) / 1000.0)
            return super().train_batch(step, shard, num_shards)
        if kind not in ("hang", "die", "corrupt"):
            return super().train_batch(step, shard, num_shards)
        marker = Path(self.fault["marker_dir"]) / f"fired-{self.fault['kind']}"
        if step == int(self.fault["at_step"]) and os.environ.get("RAY_S2P_REPLICA") == str(self.fault.get("replica", 1)) \
                and not marker.exists():
            marker.write_text(str(os.getpid()))
            kind = self.fault["kind"]
            if kind == "hang":
                time.sleep(3600)
            elif kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "corrupt":
                with torch.no_grad():
                    next(self.model_ref.parameters()).add_(1e-3)
        return super().train_batch(step, shard, num_shards)


def build(cfg: TaskConfig, seed: int) -> FaultyBlobs:
    return FaultyBlobs(cfg, seed)
