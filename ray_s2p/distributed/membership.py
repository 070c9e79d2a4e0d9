"""Which replicas a run has, step by step: starting them, phases redone with the replicas left after a drop,
replicas admitted when they start later, and what the ledger says about the replica count of every step.

With a replica range (``cluster.min_replicas``, direction mode) a replica whose replacement does not start within
``cluster.replace_timeout_s`` is dropped (healing.py ``Healer._drop``). The phase that was running when it was lost
is redone with the others: a probe round is redone whole, with the directions of the replicas present (seeds
``mix_seed(run_seed, k, j)`` for j < n q, as a run of n replicas makes them), because nothing of a step enters the
ledger before its decision; the other phases (apply, digest, evaluation, checkpoint, export) are asked again. So
no step is lost or repeated, and the ledger, which records every direction a step used and the replica that
evaluated it, stays the whole truth: replay and ``--resume`` read the coefficients it holds.

Replicas that start later (a dropped one asked for again, or one the cluster had no room for at the start) join
at a step boundary (``admit_waiting``) after catching up from the newest checkpoint and the ledger since it.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable, Sequence, TypeVar

from ..config import RunConfig
from ..errors import RayS2PError
from ..storage_fs import Location
from ..zo.environment import describe, differences
from ..zo.ledger import LedgerRow
from .console import ray_start_failure
from .healing import Healer, ReplicasDropped
from .pool import PoolFactory, ReplicaPool
from .ray_pool import RayPool
from .replica import ClusterError, LocalPool, ReplicaFailure, quiet_libraries
from .run_state import RunState
from .storage import StorageError, check_storage

F = TypeVar("F", bound=Callable[..., Any])


def redone_on_drop(phase: F) -> F:
    """Run ``phase`` again, with the replicas left, each time replicas are dropped during it."""
    @functools.wraps(phase)
    def run(*args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                return phase(*args, **kwargs)
            except ReplicasDropped:
                continue
    return run  # type: ignore[return-value]


def steps_at_size(rows: Sequence[LedgerRow], directions: int) -> dict[str, int]:
    """{replica count: steps} of a run, read from its ledger, so a resumed run counts its steps from before the
    resume too: each group of replicas evaluates ``directions`` directions of a step, and a row's ``shards`` says
    how many replicas its group had (data and hybrid mode; 1 in direction mode)."""
    per_step: Counter[int] = Counter()
    for row in rows:
        per_step[row.step] += row.shards or 1
    sizes = Counter(count // directions for count in per_step.values())
    return {str(n): sizes[n] for n in sorted(sizes, reverse=True)}


def start_pool(config: RunConfig, factory: PoolFactory | None, verbose: bool, log: Callable[[str], None], *,
               nothing_written: bool) -> ReplicaPool:
    """The run's replicas: in-process (``cluster.use_ray: false``), or Ray actors after ``ray.init`` (to
    ``cluster.address``) where Ray is not up yet; ``factory`` builds a pool of the caller's own.

    Raises:
        ClusterError: Ray did not start (one line: what failed, that nothing was written if so, the fix).
    """
    if not config.cluster.use_ray:
        with quiet_libraries(not verbose):  # in-process replicas share the driver's console
            return (factory or LocalPool)(config)
    import logging

    import ray
    if not ray.is_initialized():
        # Ray's own start-up lines only with --verbose; its warnings and errors always.
        try:
            ray.init(address=config.cluster.address or None, include_dashboard=False, log_to_driver=True,
                     logging_level=logging.INFO if verbose else logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - whatever stopped Ray, the user gets one line and a fix
            raise ClusterError(ray_start_failure(exc, config.cluster.address, nothing_written=nothing_written)) \
                from exc
    if factory is not None:
        return factory(config)
    return RayPool(config, log=log, quiet=not verbose)


def admit_waiting(pool: ReplicaPool, healer: Healer, state: RunState, run_dir: str | Location) -> int:
    """Admit the replicas that have started since the last step (a replica range, ``pool.waiting``).

    Each must run in the run's environment (else its updates could never stay bitwise identical), reach the run
    directory (``storage.check_storage``: it reads checkpoints and writes there), and catch up from the newest
    checkpoint plus the ledger since it (``Healer.restore``: one checkpoint load and a replay, no forward passes)
    before it takes part in the next step. One in another environment or without the run directory is sent away
    for good with one line (asking again would place it on the same kind of node); one that died or failed while
    catching up is asked for again.

    Returns:
        How many joined.
    """
    joined = 0
    for slot in pool.waiting():
        position = pool.admit(slot)
        try:
            env = pool.call("info", [()], replicas=[position], timeout=healer.config.cluster.startup_timeout_s)[0][
                "environment"]
            diff = differences(state.ledger.environment or env, env)
            if diff:
                pool.drop(position, rejoin=False)
                healer.log(f"step {state.decided}: replica {slot} started on {describe(env)}, not in the run's "
                           f"environment ({'; '.join(diff)}); it is not admitted")
                continue
            try:
                check_storage(pool, run_dir, timeout=healer.config.cluster.startup_timeout_s, replicas=[position])
            except StorageError as exc:
                pool.drop(position, rejoin=False)
                healer.log(f"step {state.decided}: replica {slot} started where the run directory cannot be reached "
                           f"and is not admitted or asked for again ({exc})")
                continue
            healer.restore(pool, [position], state.ckpt, state.ledger, state.decided)
        except (ReplicaFailure, RayS2PError) as exc:  # died while catching up, or cannot read the checkpoint
            pool.drop(position)
            healer.log(f"step {state.decided}: replica {slot} could not join ({exc}); it is asked for again")
            continue
        joined += 1
        since = state.ckpt.step if state.ckpt is not None else 0
        healer.log(f"step {state.decided}: replica {slot} joined (checkpoint of step {since} + {state.decided - since} "
                   f"ledger steps); the run goes on with {pool.size} replicas")
    return joined
