"""A replica as the pools run it: the Ray actor class (``ReplicaHost``), the pools' errors, and the in-process
pool (``LocalPool``); the Ray pool is ray_pool.py.

Both pools expose the same calls (pool.py); each call fans out to the given replicas and waits once. A pool
raises ``ReplicaFailure`` naming the replicas that died or did not answer within the timeout, so the driver can
replace them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

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

    def drop(self, replica: int, rejoin: bool = True) -> None:
        del self.engines[replica], self.slots[replica]

    def waiting(self) -> list[int]:
        """In-process replicas are never lost to capacity: none waits to join."""
        return []

    def admit(self, slot: int) -> int:
        self.engines.append(ReplicaEngine(self.config, slot))
        self.slots.append(slot)
        return self.size - 1

    def pids(self) -> list[int]:
        return [os.getpid()] * self.size

    def places(self) -> list[dict[str, Any]]:
        return [{"node_ip": "in-process", "node_id": None, "pid": os.getpid(), "resources": {}}] * self.size

    def attach_logs(self, directory: Path) -> None:
        """In-process replicas print into the driver's own output; nothing to move."""

    def shutdown(self) -> None:
        self.engines = []
