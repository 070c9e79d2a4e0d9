"""A replica's worker process SIGKILLed inside every phase of a step, not only between steps.

The kills come from outside the replica, as a crashed machine would: the driver's pool is a RayPool
that, when the driver enters a given call (probe, apply, digest, evaluate, save_checkpoint, write_final,
or the replay of a replacement catching up), first SIGKILLs the worker process of one replica (its pid
asked from the actor) and waits until the process is gone. The call then finds the replica dead inside
that phase; the run must replace it, catch it up from checkpoint + ledger, redo the phase and end at
the digest of an undisturbed run.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from safetensors.torch import load_file

from conftest import smoke_dict
from ray_s2p.config import RunConfig
from ray_s2p.distributed.digest import model_digest
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.ray_pool import RayPool
from ray_s2p.tasks import build_task

# (method, which call of it, the replica killed): steps 20, digest every 5, evaluation and checkpoint every 10.
PLAN = [
    ("probe", 3, 1),            # the probe round of step 3 ...
    ("replay", 1, 1),           # ... and its replacement while it replays the ledger to step 2
    ("digest", 1, 0),           # the digest check of step 5
    ("apply", 2, 1),            # the early apply of update 10 before its digest check
    ("evaluate", 2, 0),         # the evaluation of step 10 (the first is the starting point's)
    ("save_checkpoint", 1, 0),  # replica 0 writing the checkpoint of step 10
    ("write_final", 1, 0),      # replica 0 writing final/ after step 20
]


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Until ``pid`` has exited (absent, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs {timeout}s after SIGKILL")


class KillingPool(RayPool):
    """A RayPool that SIGKILLs a replica's worker process when the driver enters a call of ``PLAN``."""

    killed: list[tuple[str, int, int]] = []

    def __init__(self, *args, **kwargs) -> None:
        self.seen: Counter[str] = Counter()
        super().__init__(*args, **kwargs)

    def call(self, method, args, replicas=None, timeout=None):
        import ray

        self.seen[method] += 1
        for target in PLAN:
            name, nth, victim = target
            if (name, nth) == (method, self.seen[method]) and target not in KillingPool.killed:
                pid = ray.get(self.actors[victim].pid.remote(), timeout=60)
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid)
                KillingPool.killed.append(target)
        return super().call(method, args, replicas, timeout)


def test_a_replica_killed_inside_every_phase_is_healed_to_the_undisturbed_digest(tmp_path, ray_session):
    data = smoke_dict(**{"steps": 20, "cluster.use_ray": True, "cluster.digest_every": 5, "log_every": 5})
    cfg = RunConfig.from_dict(data)
    reference = train(cfg.replace({"cluster.use_ray": False}), tmp_path / "reference", log=lambda m: None)
    KillingPool.killed = []
    messages: list[str] = []
    result = train(cfg, tmp_path / "run", log=messages.append, pool=lambda c: KillingPool(c, log=messages.append))

    assert KillingPool.killed == PLAN
    for method, _, victim in PLAN:  # each death was seen, and healed, inside its own phase
        assert any(f"{method!r} failed: replica {victim} died" in m for m in messages), (method, messages)
    assert result.summary["replica_failures"] == len(PLAN)
    assert result.final_digest == reference.final_digest
    assert result.summary["final_metrics"] == reference.summary["final_metrics"]
    rows = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    assert sorted((r["step"], r["direction"]) for r in rows) == [(k, j) for k in range(1, 21) for j in range(2)]
    # What replica 0 wrote after it was replaced mid-export is the trained model.
    net = build_task(cfg.task, cfg.seed).build_model()
    net.load_state_dict(load_file(str(tmp_path / "run" / "final" / "model.safetensors")))
    assert model_digest(net) == reference.final_digest
