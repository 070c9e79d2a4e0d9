"""Replica pools: the Ray actors (one per replica) and an in-process stand-in.

Both pools expose the same calls; each call fans out to the given replicas
and waits once. A Ray pool raises ``ReplicaFailure`` naming the replicas that
died or did not answer within the timeout, so the driver can replace them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..config import RunConfig
from ..errors import RayS2PError
from .engine import ReplicaEngine
from .messages import Traffic
from .pool import ReplicaMethod, check_method


class ClusterError(RayS2PError, RuntimeError):
    """The cluster cannot host the replicas the config asks for; the message names what is missing."""


class ReplicaError(RayS2PError, RuntimeError):
    """A replica refused its input (a project error raised inside it); the message is the replica's own."""


class ReplicaFailure(RayS2PError, RuntimeError):
    """Some replicas died or hung; ``results`` holds the answers of the others (None where failed)."""

    def __init__(self, failed: list[int], results: list[Any], reason: str) -> None:
        super().__init__(f"replicas {failed} failed: {reason}")
        self.failed = failed
        self.results = results
        self.reason = reason


class ReplicaHost:
    """What a Ray replica actor runs: a thin shell over ``ReplicaEngine``.

    With ``quiet`` the process's stdout and stderr (libraries' load reports, progress bars,
    warnings, C++ output alike) go to a node-local file from before the model is built, and
    ``attach_log`` moves them into the run directory once the run is confirmed: a refused
    resume leaves nothing behind, and Ray forwards none of it to the driver's console.
    """

    def __init__(self, config_dict: dict[str, Any], replica: int, quiet: bool = False) -> None:
        self.output = OutputFile() if quiet else None
        cfg = RunConfig.from_dict(config_dict)
        os.environ["RAY_S2P_REPLICA"] = str(replica)  # one actor per process: lets user tasks know their index
        self.engine = ReplicaEngine(cfg, replica)

    def call(self, method: ReplicaMethod, *args: Any) -> Any:
        check_method(method)
        return getattr(self.engine, method)(*args)

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def place(self) -> dict[str, Any]:
        """Where this replica runs: node IP and id, process id, and the resources Ray assigned it."""
        import ray
        context = ray.get_runtime_context()
        return {"node_ip": ray.util.get_node_ip_address(), "node_id": context.get_node_id(), "pid": os.getpid(),
                "resources": {k: v for k, v in context.get_assigned_resources().items()
                              if not k.startswith("bundle_group")}}

    def attach_log(self, path: str) -> None:
        """Append what this process printed so far to ``path`` and send the rest there too."""
        if self.output is not None:
            self.output.move_to(Path(path))


class OutputFile:
    """This process's file descriptors 1 and 2 redirected into a file (first a temporary one)."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="ray_s2p_replica_", suffix=".log")
        self.path = Path(name)
        self._point(fd)

    def _point(self, fd: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def move_to(self, path: Path) -> None:
        if path == self.path:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(path, "ab") as out, open(self.path, "rb") as earlier:
            shutil.copyfileobj(earlier, out)
        self._point(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        self.path.unlink(missing_ok=True)
        self.path = path


def replica_bundle(config: RunConfig) -> dict[str, float]:
    """The Ray resources one replica asks for: exactly the config's CPUs, GPUs and memory (bytes)."""
    c = config.cluster
    bundle: dict[str, float] = {"CPU": c.cpus_per_replica}
    if c.gpus_per_replica:
        bundle["GPU"] = c.gpus_per_replica
    if c.memory_per_replica_gb:
        bundle["memory"] = float(int(c.memory_per_replica_gb * 2**30))
    return bundle


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """transformers' load reports, warnings and progress bars silenced while the block runs (when ``quiet``)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class LocalPool:
    """Replicas as plain objects in this process (cluster.use_ray = false)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.engines = [ReplicaEngine(config, r) for r in range(config.cluster.replicas)]
        self.slots = list(range(config.cluster.replicas))
        self.traffic = Traffic()

    @property
    def size(self) -> int:
        return len(self.engines)

    def call(self, method: ReplicaMethod, args: Sequence[tuple], replicas: Sequence[int] | None = None,
             timeout: float | None = None) -> list[Any]:
        check_method(method)
        idx = list(range(self.size)) if replicas is None else list(replicas)
        results = [getattr(self.engines[r], method)(*a) for r, a in zip(idx, args)]
        self.traffic.record(method, list(args), results)  # what would cross a process boundary
        return results

    def replace(self, replica: int, timeout: float | None = None) -> None:
        self.engines[replica] = ReplicaEngine(self.config, self.slots[replica])

    def drop(self, replica: int) -> None:
        del self.engines[replica], self.slots[replica]

    def pids(self) -> list[int]:
        return [os.getpid()] * self.size

    def places(self) -> list[dict[str, Any]]:
        return [{"node_ip": "in-process", "node_id": None, "pid": os.getpid(), "resources": {}}] * self.size

    def attach_logs(self, directory: Path) -> None:
        """In-process replicas print into the driver's own output; nothing to move."""

    def shutdown(self) -> None:
        self.engines = []


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
        if not self.owns_pg:
            self.pg = current
            ready = [True]
        else:
            self._check_resources(bundle, c.replicas)
            self.pg = placement_group([dict(bundle) for _ in range(c.replicas)], strategy=c.placement_strategy)
            ready, _ = ray.wait([self.pg.ready()], timeout=c.startup_timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise ClusterError(
                f"could not reserve {c.replicas} replica bundles of {bundle} within "
                f"cluster.startup_timeout_s={c.startup_timeout_s}s; the cluster has {ray.cluster_resources()}. "
                f"Fix: lower cluster.replicas or cluster.cpus_per_replica/gpus_per_replica, or add nodes")
        self._remote = ray.remote(ReplicaHost)
        self.slots = list(range(c.replicas))  # a position's replica number and bundle (positions shift on a drop)
        self.actors: list[Any] = [None] * c.replicas
        for r in range(c.replicas):
            self.actors[r] = self._spawn(r)
        # Wait for every actor's __init__ (model build) once, with the startup timeout.
        self.call("info", [()] * c.replicas, timeout=c.startup_timeout_s)

    def _check_resources(self, bundle: dict[str, float], replicas: int) -> None:
        import ray
        total = ray.cluster_resources()
        for key, need in bundle.items():
            have = total.get(key, 0.0)
            if need * replicas > have and not _autoscaling():
                raise ClusterError(
                    f"cluster.replicas={replicas} x {key}={need} per replica needs {need * replicas:g} {key}, "
                    f"but the cluster has {have:g}. Fix: lower cluster.replicas or cluster."
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
                placement_group=self.pg, placement_group_bundle_index=replica + self.bundle_offset),
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
                reasons.append(f"replica {idx[pos]} did not answer {method!r} in time")
                continue
            try:
                results[pos] = ray.get(ref)
            except (RayActorError, GetTimeoutError) as exc:
                if getattr(exc, "actor_init_failed", False):
                    # Building the task/model raised: bad config or data, not a fault to heal by restarting.
                    raise _remote_error(exc)(f"replica {idx[pos]} could not start: {_root_cause(exc)}") from exc
                failed.append(idx[pos])
                reasons.append(f"replica {idx[pos]} died ({type(exc).__name__})")
            except RayError as exc:
                # An exception raised inside the replica's code is a bug or bad input, not a fault to heal.
                raise _remote_error(exc)(f"replica {idx[pos]} raised in {method!r}: {_root_cause(exc)}") from exc
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
        self.actors[replica] = self._spawn(slot)
        self.call("info", [()], replicas=[replica],
                  timeout=timeout if timeout is not None else self.config.cluster.startup_timeout_s)
        if self.log_dir is not None:
            ray.get(self.actors[replica].attach_log.remote(str(self.log_dir / f"replica-{slot}.log")), timeout=60)

    def drop(self, replica: int) -> None:
        """Kill position ``replica`` (a replacement still waiting for its bundle too) and remove it."""
        import ray
        try:
            ray.kill(self.actors[replica], no_restart=True)
        except Exception:  # already gone
            pass
        del self.actors[replica], self.slots[replica]

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
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self.owns_pg:
            try:
                ray.util.remove_placement_group(self.pg)
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
