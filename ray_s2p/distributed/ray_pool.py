"""The Ray replica pool: one actor per replica, each in a placement-group bundle.

Every call fans out to the given replicas and waits once; replicas that die or do not answer within the timeout
are named in a ``ReplicaFailure``, so the driver can replace them (healing.py). With a replica range
(``cluster.min_replicas``) the run starts once the minimum is placed; the other replicas wait for room as pending
actors in placement groups of their own (the autoscaler sees the demand) and join when they start
(membership.py); a dropped replica is asked for again the same way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import RunConfig
from ..errors import RayS2PError
from .messages import Traffic
from .pool import ReplicaMethod, check_method
from .replica import ClusterError, ReplicaError, ReplicaFailure, ReplicaHost, replica_bundle

PLACEMENT_GRACE_S = 3.0  # a replica range: how long a lost bundle may take to be placed on another node


class RayPool:
    """One Ray actor per replica, each in its own placement-group bundle."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] = print, quiet: bool = False) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.config = config
        self.log = log
        self.quiet = quiet  # replicas' library output to a file (ReplicaHost), not the driver's console
        self.log_dir: Path | None = None  # set by attach_logs once the run is confirmed
        self.traffic = Traffic()
        c = config.cluster
        bundle = replica_bundle(config)
        # Inside a Ray Tune trial the replicas' bundles are already reserved by the trial's
        # PlacementGroupFactory ([driver] + [replica] * n): use them instead of a nested group.
        from ray.util import get_current_placement_group
        current = get_current_placement_group()
        self.owns_pg = not (current is not None and len(current.bundle_specs) >= c.replicas + 1)
        self.bundle_offset = 0 if self.owns_pg else 1
        # A replica range gives every replica a one-bundle group of its own and starts once the minimum is placed;
        # the others start whenever room for them appears. (One group for several replicas would lose a bundle
        # with a node and stay in rescheduling, which Ray keeps retrying, slowing every step on a small machine.)
        # Inside a Tune trial every bundle is reserved already: no range there.
        self.elastic = c.elastic and self.owns_pg
        first = c.min_replicas if self.elastic else c.replicas
        self.slot_groups: dict[int, Any] = {}  # slot -> its own placement group (a replica range)
        initial = list(range(first))
        if not self.owns_pg:
            self.pg = current
            ready = [True]
        elif self.elastic:
            self._check_resources(bundle, first, "min_replicas")
            self.pg = None
            self.slot_groups = {slot: self._slot_group() for slot in range(c.replicas)}
            refs = {group.ready(): slot for slot, group in self.slot_groups.items()}
            ready, _ = ray.wait(list(refs), num_returns=first, timeout=c.startup_timeout_s)
            initial = sorted(refs[r] for r in ready)
            ready = ready if len(ready) >= first else []
        else:
            self._check_resources(bundle, first, "replicas")
            self.pg = placement_group([dict(bundle) for _ in range(first)], strategy=c.placement_strategy)
            ready, _ = ray.wait([self.pg.ready()], timeout=c.startup_timeout_s)
        if not ready:
            for group in [self.pg] * (self.pg is not None) + list(self.slot_groups.values()):
                ray.util.remove_placement_group(group)
            raise ClusterError(
                f"could not reserve {first} replica bundles of {bundle} within "
                f"cluster.startup_timeout_s={c.startup_timeout_s}s; the cluster has {ray.cluster_resources()}. "
                f"Fix: lower cluster.{'min_replicas' if self.elastic else 'replicas'} or "
                f"cluster.cpus_per_replica/gpus_per_replica, or add nodes")
        self._remote = ray.remote(ReplicaHost)
        self.pending: dict[int, tuple[Any, Any]] = {}  # slot -> (actor not yet admitted, its info call)
        self.slots = initial  # a position's replica number and bundle (positions shift on a drop)
        self.actors: list[Any] = [self._spawn(r) for r in initial]
        for slot in self.slot_groups:
            if slot not in initial:
                self._request(slot)
        # Wait for every actor's __init__ (model build) once, with the startup timeout.
        self.call("info", [()] * first, timeout=c.startup_timeout_s)

    def _request(self, slot: int) -> None:
        """Ask for a replica in ``slot``: a pending actor until its bundle is placed, admitted once it is up."""
        actor = self._spawn(slot)
        self.pending[slot] = (actor, actor.call.remote("info"))

    def waiting(self) -> list[int]:
        """Slots whose requested replica has started (its model is built); nothing is waited for."""
        import ray
        if not self.pending:
            return []
        refs = {ref: slot for slot, (_, ref) in self.pending.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        return sorted(refs[ref] for ref in ready)

    def admit(self, slot: int) -> int:
        """The started replica of ``slot`` becomes the last position (its output goes to its log file)."""
        import ray
        actor, _ = self.pending.pop(slot)
        self.actors.append(actor)
        self.slots.append(slot)
        if self.log_dir is not None:
            ray.get(actor.attach_log.remote(str(self.log_dir / f"replica-{slot}.log")), timeout=60)
        return self.size - 1

    def _check_resources(self, bundle: dict[str, float], replicas: int, count: str = "replicas") -> None:
        """Refuse at once (no autoscaler) what the cluster can never place: ``replicas`` bundles, ``count`` the key."""
        import ray
        total = ray.cluster_resources()
        for key, need in bundle.items():
            have = total.get(key, 0.0)
            if need * replicas > have and not _autoscaling():
                raise ClusterError(
                    f"cluster.{count}={replicas} x {key}={need} per replica needs {need * replicas:g} {key}, "
                    f"but the cluster has {have:g}. Fix: lower cluster.{count} or cluster."
                    f"{ {'GPU': 'gpus', 'CPU': 'cpus'}.get(key, 'memory') }_per_replica"
                    f"{'_gb' if key == 'memory' else ''}, or add nodes")

    def _spawn(self, replica: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        c = self.config.cluster
        threads = c.threads_per_replica or max(1, int(c.cpus_per_replica))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        options: dict[str, Any] = dict(
            num_cpus=c.cpus_per_replica, num_gpus=c.gpus_per_replica, memory=replica_bundle(self.config).get("memory"),
            max_restarts=0, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.slot_groups.get(replica, self.pg),
                placement_group_bundle_index=0 if replica in self.slot_groups else replica + self.bundle_offset),
            runtime_env={"env_vars": env})
        cfg = self.config.to_dict()
        if not cfg["cluster"].get("threads_per_replica"):
            cfg["cluster"]["threads_per_replica"] = threads
        return self._remote.options(**options).remote(cfg, replica, self.quiet)

    @property
    def size(self) -> int:
        return len(self.actors)

    def call(self, method: ReplicaMethod, args: Sequence[tuple], replicas: Sequence[int] | None = None,
             timeout: float | None = None) -> list[Any]:
        """Fan out ``method`` to the replicas, then one wait; raise ReplicaFailure on death or timeout."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        check_method(method)
        idx = list(range(self.size)) if replicas is None else list(replicas)
        refs = [self.actors[r].call.remote(method, *a) for r, a in zip(idx, args)]
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.cluster.step_timeout_s)
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        results: list[Any] = [None] * len(idx)
        failed: list[int] = []
        reasons = []
        for pos, ref in enumerate(refs):
            if ref in pending:
                failed.append(idx[pos])
                reasons.append(f"replica {self.slots[idx[pos]]} did not answer {method!r} in time")
                continue
            try:
                results[pos] = ray.get(ref)
            except (RayActorError, GetTimeoutError) as exc:
                if getattr(exc, "actor_init_failed", False):
                    # Building the task/model raised: bad config or data, not a fault to heal by restarting.
                    raise _remote_error(exc)(f"replica {self.slots[idx[pos]]} could not start: "
                                             f"{_root_cause(exc)}") from exc
                failed.append(idx[pos])
                reasons.append(f"replica {self.slots[idx[pos]]} died ({type(exc).__name__})")
            except RayError as exc:
                # An exception raised inside the replica's code is a bug or bad input, not a fault to heal.
                raise _remote_error(exc)(f"replica {self.slots[idx[pos]]} raised in {method!r}: "
                                         f"{_root_cause(exc)}") from exc
        self.traffic.record(method, list(args), [r for r in results if r is not None])
        if failed:
            raise ReplicaFailure(failed, results, "; ".join(reasons))
        return results

    def replace(self, replica: int, timeout: float | None = None) -> None:
        """Kill (if still there) and start a fresh actor in the same bundle."""
        import ray
        try:
            ray.kill(self.actors[replica], no_restart=True)
        except Exception:  # already gone
            pass
        slot = self.slots[replica]
        if self.elastic and not _autoscaling() and not self._placed(slot):
            # Without an autoscaler nothing can make room: waiting out cluster.replace_timeout_s would only stall
            # the run. Dropped now; its drop asks for it again, and it joins when room appears (membership.py).
            raise ReplicaFailure([replica], [None], f"replica {slot}'s bundle lost its node and no other node has "
                                                    f"room for it")
        self.actors[replica] = self._spawn(slot)
        self.call("info", [()], replicas=[replica],
                  timeout=timeout if timeout is not None else self.config.cluster.startup_timeout_s)
        if self.log_dir is not None:
            ray.get(self.actors[replica].attach_log.remote(str(self.log_dir / f"replica-{slot}.log")), timeout=60)

    def _slot_group(self) -> Any:
        """A one-bundle placement group for one replica of a range (requested now, placed when room appears)."""
        from ray.util.placement_group import placement_group
        return placement_group([dict(replica_bundle(self.config))], strategy=self.config.cluster.placement_strategy)

    def _placed(self, slot: int) -> bool:
        """Whether the placement group of ``slot``'s bundle is placed, given PLACEMENT_GRACE_S to be placed again
        after losing a node (Ray moves the group's bundles to a node with room, if there is one). False at once
        when the cluster has not even one bundle's resources free: then no node can take it."""
        import ray
        from ray.util import placement_group_table
        group = self.slot_groups.get(slot, self.pg)
        bundle = replica_bundle(self.config)
        deadline = time.monotonic() + PLACEMENT_GRACE_S
        while True:
            if placement_group_table(group).get("state") == "CREATED":
                return True
            free = ray.available_resources()
            if time.monotonic() >= deadline or any(free.get(k, 0.0) < v for k, v in bundle.items()):
                return False
            time.sleep(0.2)

    def drop(self, replica: int, rejoin: bool = True) -> None:
        """Kill position ``replica`` (a replacement still waiting for its bundle too) and remove it; in a replica
        range (and with ``rejoin``) a new replica is requested for its slot, to join when it starts."""
        import ray
        try:
            ray.kill(self.actors[replica], no_restart=True)
        except Exception:  # already gone
            pass
        slot = self.slots[replica]
        del self.actors[replica], self.slots[replica]
        if self.elastic and slot in self.slot_groups:
            # A fresh group in place of the old one: a group whose bundle lost its node stays in rescheduling, which
            # Ray's control plane retries without pause (a core busy on the head, measured on a small cluster).
            ray.util.remove_placement_group(self.slot_groups.pop(slot))
            if rejoin:
                self.slot_groups[slot] = self._slot_group()
        if self.elastic and rejoin:
            self._request(slot)

    def pids(self) -> list[int]:
        import ray
        return ray.get([a.pid.remote() for a in self.actors], timeout=60)

    def node_ids(self) -> list[str]:
        import ray
        return ray.get([a.node_id.remote() for a in self.actors], timeout=60)

    def places(self) -> list[dict[str, Any]]:
        """Node IP, node id and pid of every replica."""
        import ray
        return ray.get([a.place.remote() for a in self.actors], timeout=60)

    def attach_logs(self, directory: Path) -> None:
        """Quiet replicas append their output so far to ``directory/replica-N.log`` and keep writing there."""
        import ray
        if self.quiet:
            self.log_dir = Path(directory)
            ray.get([a.attach_log.remote(str(self.log_dir / f"replica-{slot}.log"))
                     for slot, a in zip(self.slots, self.actors)], timeout=60)

    def shutdown(self) -> None:
        import ray
        for a in [*self.actors, *(actor for actor, _ in self.pending.values())]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        # Every group goes, the requested ones too: an autoscaler would otherwise keep adding nodes for them.
        for group in [self.pg] * (self.owns_pg and self.pg is not None) + list(self.slot_groups.values()):
            try:
                ray.util.remove_placement_group(group)
            except Exception:
                pass


def _root_cause(exc: BaseException) -> str:
    """The last 'SomeError: message' line of a remote traceback (what the user needs to read)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else repr(exc)


def _remote_error(exc: BaseException) -> type[Exception]:
    """ReplicaError when a replica raised one of the project's errors (bad config, data or file: one line for
    the user), RuntimeError otherwise (a bug: the traceback stays). A failed actor start carries only the
    remote traceback's text, so its last error line is matched against the project's error names."""
    if isinstance(exc, RayS2PError):  # Ray's RayTaskError(Cause) is an instance of the cause's class
        return ReplicaError
    head = _root_cause(exc).split(":", 1)[0]
    name = head.rsplit(".", 1)[-1].rstrip(")").split("(")[-1]
    return ReplicaError if name in _error_names(RayS2PError) else RuntimeError


def _error_names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_error_names(sub) for sub in cls.__subclasses__()))


def _autoscaling() -> bool:
    # On an autoscaling cluster missing resources may still arrive; the placement-group wait bounds it.
    return os.environ.get("RAY_S2P_AUTOSCALING", "0") == "1"
