"""Small typed messages between the driver and the replicas.

Every message has a compact JSON encoding; ``json_bytes`` is its length, which
is what the driver counts as bytes sent/received per step. Floats are encoded
with ``repr`` precision by json, so coefficients arrive bit-exact.

``Traffic`` counts every call between the driver and the replicas (probes,
digests, evaluation, checkpoints, restores, the final export) by the size of its
payload (``payload_bytes``), and keeps the largest single message: the check that
no model-sized message ever travels.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Update:
    """The update of one step: x <- param_scale * x + sum c_i z(seed_i).

    With ``sign_step = a`` (ZO-signSGD) it is x <- param_scale * x - a sign(sum c_i z(seed_i)).
    """

    step: int
    pairs: tuple[tuple[int, float], ...]
    param_scale: float = 1.0
    sign_step: float | None = None


@dataclass(frozen=True)
class ProbeRequest:
    """One step's work for one replica.

    The replica first applies ``update`` (the previous step's, if it has not yet),
    then evaluates f(x + t z(seed)) for every seed and every radius t on its
    data shard of this step.
    """

    step: int
    seeds: tuple[int, ...]
    radii: tuple[float, ...]
    shard: int
    num_shards: int
    update: Update | None = None
    per_seed_radii: tuple[tuple[float, ...], ...] | None = None  # follow-up round: radii differ per seed

    def json_bytes(self) -> int:
        data = asdict(self)
        if data["update"] is not None and data["update"]["sign_step"] is None:
            del data["update"]["sign_step"]  # only sign updates carry it: a linear update encodes as it always did
        return len(json.dumps(data, separators=(",", ":")))


@dataclass(frozen=True)
class ProbeReply:
    """Loss scalars: losses[i][j] = f(x + radii[j] * z(seeds[i]))."""

    step: int
    replica: int
    losses: tuple[tuple[float, ...], ...]
    applied_step: int
    seconds: float = 0.0

    def json_bytes(self) -> int:
        return len(json.dumps(asdict(self), separators=(",", ":")))


def payload_bytes(obj: Any) -> int:
    """The size of a message's content in bytes: its JSON length for the probe messages, raw bytes for
    tensors, arrays and bytes, UTF-8 length for strings, 8 per number, the sum of the parts for
    containers and dataclasses (Ray's framing around them is not counted).

    Tensors are counted by ``nbytes`` without touching their data, so the count is cheap even for the
    model-sized messages it exists to catch.
    """
    size = getattr(obj, "json_bytes", None)
    if callable(size):
        return int(size())
    if obj is None or isinstance(obj, (bool, int, float)):
        return 8
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    nbytes = getattr(obj, "nbytes", None)  # torch tensors and numpy arrays
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(payload_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return len(repr(obj).encode())


@dataclass
class Traffic:
    """Bytes between the driver and the replicas, per call name and in total, and the largest message."""

    per_method: dict[str, dict[str, int]] = field(default_factory=dict)
    largest: dict[str, Any] = field(default_factory=lambda: {"bytes": 0, "method": None, "direction": None})

    def record(self, method: str, sent: list[Any], received: list[Any]) -> None:
        """Count one fan-out: ``sent`` the argument tuples (one message per replica), ``received`` the answers."""
        entry = self.per_method.setdefault(method, {"calls": 0, "messages": 0, "sent": 0, "received": 0})
        entry["calls"] += 1
        for direction, items in (("sent", sent), ("received", received)):
            for item in items:
                size = payload_bytes(item)
                entry[direction] += size
                entry["messages"] += 1
                if size > self.largest["bytes"]:
                    self.largest = {"bytes": size, "method": method, "direction": direction}

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals: bytes sent and received, messages, the largest message, per call name."""
        return {"sent": sum(e["sent"] for e in self.per_method.values()),
                "received": sum(e["received"] for e in self.per_method.values()),
                "messages": sum(e["messages"] for e in self.per_method.values()),
                "largest_message": dict(self.largest),
                "per_method": {k: dict(v) for k, v in sorted(self.per_method.items())}}
