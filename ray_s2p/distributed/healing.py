"""Replica failures healed in whatever phase they happen: replace, catch up, redo the phase's part.

Every call the driver makes to its replicas during a run (probe, apply, digest, evaluate,
save_checkpoint, write_final, and the catch-up calls themselves) goes through ``Healer.call``. When
replicas die or hang (``ReplicaFailure``), the answers of the others are kept; each failed replica is
replaced by a new actor in the same bundle, caught up, and asked again for its own part only.

Catching up needs no phase-specific state: a replacement loads the newest checkpoint from the run
directory itself and replays the ledger up to the last *decided* step (``RunState.decided``), with no
forward passes. That is the right point in every phase:

- in a probe round of step k the ledger ends at k-1, and the request that is sent again carries the
  update of k-1, which the new replica recognises as applied;
- in apply, digest, evaluation, checkpoint and export after step k the ledger ends at k, and the
  pending update of k, sent again, is recognised as applied.

So a phase redone on a replacement sees exactly the parameters the dead replica had, and the run ends at
the digest of an undisturbed run.

A first-order reference (sgd, adamw) writes no ledger: its steps live only in its replica's parameters
and optimizer state, so a replacement could only go back to the newest checkpoint and carry on from a
stale point. Its failures are not healed: the run stops with a ``TrainingError`` that names the resume,
which continues from that checkpoint exactly (tests/distributed/test_ray_trainer.py).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from ..config import FIRST_ORDER, RunConfig
from ..storage_fs import for_replica
from ..zo.ledger import Ledger, updates_by_step
from .checkpoint import Checkpoint
from .pool import ReplicaMethod, ReplicaPool
from .replica import ReplicaFailure
from .run_state import RunState, TrainingError


class ReplicasDropped(Exception):
    """Replicas that could not be replaced were dropped (``cluster.min_replicas``): the phase that was running
    is redone by the driver with the replicas left (positions have moved). Caught by the driver, never shown."""


class Healer:
    """Calls replicas, and heals the failures of a call by replacing and catching up the failed replicas.

    Args:
        config: the run config (timeouts and ``cluster.max_replica_failures``).
        fingerprint: the config fingerprint every checkpoint a replica loads must carry.
        log: where one line per failure goes.
    """

    def __init__(self, config: RunConfig, fingerprint: str, log: Callable[[str], None]) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.log = log
        self.failures = 0
        self.drops = 0  # replicas dropped because no replacement started within cluster.replace_timeout_s
        self.recoveries: list[float] = []  # seconds from a failure to its replacements being caught up

    def call(self, pool: ReplicaPool, state: RunState, method: ReplicaMethod, args: Sequence[tuple],
             replicas: Sequence[int] | None = None, timeout: float | None = None) -> list[Any]:
        """``pool.call`` that survives replica failures: the failed replicas are replaced, caught up to the
        last decided step and asked again (their own ``args`` only); the others' answers are kept.

        Args:
            pool: the replicas.
            state: the run state (checkpoint, ledger, last decided step).
            method: the replica method.
            args: one argument tuple per replica in ``replicas``.
            replicas: which replicas (default: all).
            timeout: seconds to wait (default: ``cluster.step_timeout_s``).

        Returns:
            One answer per replica, in the order of ``replicas``.

        Raises:
            TrainingError: the failures of the run exceed ``cluster.max_replica_failures``.
        """
        idx = list(range(pool.size)) if replicas is None else list(replicas)
        arg_of = dict(zip(idx, args))
        answers: dict[int, Any] = {}
        todo = idx
        while todo:
            try:
                answers.update(zip(todo, pool.call(method, [arg_of[r] for r in todo], replicas=todo,
                                                   timeout=timeout)))
                todo = []
            except ReplicaFailure as failure:
                # Answers may legitimately be None: keep every replica's that is not among the failed.
                answers.update((r, a) for r, a in zip(todo, failure.results) if r not in failure.failed)
                todo = [r for r in todo if r in failure.failed]
                self.recover(pool, todo, state, f"{method!r} failed: {failure.reason}")
        return [answers[r] for r in idx]

    def recover(self, pool: ReplicaPool, failed: list[int], state: RunState, reason: str) -> None:
        """Replace ``failed`` and catch them up to ``state.decided``; a replacement that fails too is replaced
        again (each failure counts toward ``cluster.max_replica_failures``).

        With a replica range (``cluster.min_replicas``) a replacement gets ``cluster.replace_timeout_s`` to start
        and catch up; when it does not make it, the failed replicas are dropped and the run goes on with the
        others while at least ``min_replicas`` remain (``ReplicasDropped``: the driver redoes the phase).

        Raises:
            TrainingError: the run is a first-order reference (nothing to catch a replacement up from), the
                failures exceed ``cluster.max_replica_failures``, or a replica range fell below its minimum.
            ReplicasDropped: replicas were dropped; the positions of the others have moved.
        """
        name = self.config.optimizer.name
        if name in FIRST_ORDER:
            newest = f"step {state.ckpt.step}" if state.ckpt is not None else "step 0 (no checkpoint yet)"
            raise TrainingError(f"{reason}. The first-order reference ({name}) writes no "
                                f"ledger, so a new replica cannot be caught up to this step. Fix: continue from the "
                                f"newest checkpoint, {newest}, with `ray-s2p train --resume RUN_DIR`")
        started = time.perf_counter()
        cluster = self.config.cluster
        while failed:
            self.failures += len(failed)
            limit = cluster.max_replica_failures
            if self.failures > limit:
                raise TrainingError(f"{self.failures} replica failures exceed cluster.max_replica_failures="
                                    f"{limit}: {reason}")
            self.log(f"step {state.decided}: {reason}; replacing replicas {[pool.slots[r] for r in failed]} and "
                     f"catching them up to step {state.decided} from checkpoint + ledger")
            try:
                self.replace_and_catch_up(pool, failed, state,
                                          cluster.replace_timeout_s if cluster.elastic else None)
                failed = []
            except ReplicaFailure as again:  # a replacement died or hung while it started or caught up
                failed, reason = list(again.failed), f"a replacement failed while catching up: {again.reason}"
                if cluster.elastic:
                    self._drop(pool, failed, state, reason)
        self.recoveries.append(time.perf_counter() - started)

    def _drop(self, pool: ReplicaPool, failed: list[int], state: RunState, reason: str) -> None:
        """Drop the replicas whose replacement did not start (a replica range), or stop below its minimum."""
        cluster = self.config.cluster
        slots = [pool.slots[r] for r in failed]
        left = pool.size - len(failed)
        if left < cluster.min_replicas:
            newest = f"step {state.ckpt.step}" if state.ckpt is not None else "step 0 (no checkpoint yet)"
            raise TrainingError(f"replicas {slots} were lost and not replaced within cluster.replace_timeout_s="
                                f"{cluster.replace_timeout_s:g}s ({reason}): {left} would be left, below "
                                f"cluster.min_replicas={cluster.min_replicas}. Fix: add capacity (nodes or GPUs) and "
                                f"continue from the newest checkpoint, {newest}, with `ray-s2p train --resume RUN_DIR`")
        for r in sorted(failed, reverse=True):  # from the back: the positions before each stay valid
            pool.drop(r)
        self.drops += len(failed)
        self.log(f"step {state.decided}: replicas {slots} could not be replaced within cluster.replace_timeout_s="
                 f"{cluster.replace_timeout_s:g}s ({reason}); dropped, the run goes on with {pool.size} replicas "
                 f"(cluster.min_replicas={cluster.min_replicas})")
        raise ReplicasDropped(slots)

    def replace_and_catch_up(self, pool: ReplicaPool, replicas: list[int], state: RunState,
                             timeout: float | None = None) -> None:
        """New actors for ``replicas``, restored to the last decided step (raises ReplicaFailure if one fails);
        ``timeout``: seconds each new actor gets to start (default ``cluster.startup_timeout_s``)."""
        failed, reasons = [], []
        for r in replicas:  # every one is tried: the failure of one must not hide another's
            try:
                if timeout is None:
                    pool.replace(r)
                else:
                    pool.replace(r, timeout)
            except ReplicaFailure as failure:
                failed.append(r)
                reasons.append(failure.reason)
        if failed:
            raise ReplicaFailure(failed, [None] * len(failed), "; ".join(reasons))
        self.restore(pool, replicas, state.ckpt, state.ledger, state.decided)

    def restore(self, pool: ReplicaPool, replicas: list[int], ckpt: Checkpoint | None, ledger: Ledger,
                upto: int) -> None:
        """Bring replicas to step ``upto``: each loads the checkpoint from the run directory itself (the driver
        sends only its path), then replays the ledger (no forward passes)."""
        if ckpt is not None and ckpt.step > 0:
            # Absolute paths or URIs: a replica's working directory need not be the driver's.
            _named_call(pool, "load_checkpoint", [(for_replica(ckpt.path), self.fingerprint)] * len(replicas),
                        replicas, self.config.cluster.model_load_timeout_s)
        start = ckpt.step if ckpt is not None else 0
        updates = [u for u in updates_by_step(ledger.rows) if start < u[0] <= upto]
        if updates:
            _named_call(pool, "replay", [(updates,)] * len(replicas), replicas, self.config.cluster.startup_timeout_s)


def _named_call(pool: ReplicaPool, method: ReplicaMethod, args: Sequence[tuple], replicas: list[int],
                timeout: float) -> list[Any]:
    """``pool.call`` whose ReplicaFailure says which call failed (for the one log line of the recovery)."""
    try:
        return pool.call(method, args, replicas=replicas, timeout=timeout)
    except ReplicaFailure as failure:
        raise ReplicaFailure(failure.failed, failure.results, f"{method!r} failed: {failure.reason}") from failure
