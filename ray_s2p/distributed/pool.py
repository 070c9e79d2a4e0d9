"""The replica pool as the driver sees it: one protocol, the names of the calls it makes, and the factory a
``Driver`` takes to build one (``LocalPool`` in replica.py and ``RayPool`` in ray_pool.py are the two it ships
with).

Kept apart from replica.py so that the modules the replicas themselves import (storage.py) can name the
pool without importing the replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence, get_args

from ..config import RunConfig
from .messages import Traffic

# The replica methods the driver calls, by name: one declaration, checked by every pool before a call and
# against ReplicaEngine by tests/distributed/test_replica_errors.py, so a misspelt or renamed method fails at
# the call site, not as a remote AttributeError.
ReplicaMethod = Literal["info", "probe", "apply", "digest", "evaluate", "first_order_step", "check_storage",
                        "verify_checkpoint", "load_checkpoint", "save_checkpoint", "write_final", "replay"]
REPLICA_METHODS: tuple[str, ...] = get_args(ReplicaMethod)


def check_method(method: str) -> None:
    """Refuse a name that is not a ``ReplicaMethod`` (a bug in the caller, so a plain ValueError)."""
    if method not in REPLICA_METHODS:
        raise ValueError(f"{method!r} is not a replica method; the pools call {', '.join(REPLICA_METHODS)}")


class ReplicaPool(Protocol):
    """What the driver needs of its replicas, in-process (``LocalPool``) or Ray actors (``RayPool``)."""

    traffic: Traffic

    @property
    def size(self) -> int: ...

    def call(self, method: ReplicaMethod, args: Sequence[tuple], replicas: Sequence[int] | None = None,
             timeout: float | None = None) -> list[Any]:
        """One fan-out: ``args[i]`` to replica ``replicas[i]`` (default: all); the answers in that order.
        Raises ``ReplicaFailure`` (with the others' answers) when replicas die or hang."""
        ...

    @property
    def slots(self) -> list[int]:
        """The replica number of each position (``range(size)`` until a replica is dropped): what logs, the
        ledger's ``replica`` column and the replica's bundle are named by."""
        ...

    def replace(self, replica: int, timeout: float | None = None) -> None:
        """A new replica in the place of position ``replica`` (its state is the task's starting point), started
        within ``timeout`` seconds (default: ``cluster.startup_timeout_s``), else ``ReplicaFailure``."""
        ...

    def drop(self, replica: int, rejoin: bool = True) -> None:
        """Stop position ``replica`` and remove it: the positions after it move down by one. With a replica range
        and ``rejoin``, a new replica is asked for in its place, to join when it starts (``waiting``)."""
        ...

    def waiting(self) -> list[int]:
        """Slots whose replica has started and waits to be admitted (without waiting for any)."""
        ...

    def admit(self, slot: int) -> int:
        """Move the waiting replica of ``slot`` into the pool; its position (the last)."""
        ...

    def places(self) -> list[dict[str, Any]]: ...

    def attach_logs(self, directory: Path) -> None: ...

    def shutdown(self) -> None: ...


PoolFactory = Callable[[RunConfig], ReplicaPool]
