"""Small typed messages between the driver and the replicas.

Every message has a compact JSON encoding; ``wire_bytes`` is its length, which
is what the driver counts as bytes sent/received per step. Floats are encoded
with ``repr`` precision by json, so coefficients arrive bit-exact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Update:
    """The update of one step: x <- param_scale * x + sum c_i z(seed_i)."""

    step: int
    pairs: tuple[tuple[int, float], ...]
    param_scale: float = 1.0


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

    def wire_bytes(self) -> int:
        return len(json.dumps(asdict(self), separators=(",", ":")))


@dataclass(frozen=True)
class ProbeReply:
    """Loss scalars: losses[i][j] = f(x + radii[j] * z(seeds[i]))."""

    step: int
    replica: int
    losses: tuple[tuple[float, ...], ...]
    applied_step: int
    seconds: float = 0.0

    def wire_bytes(self) -> int:
        return len(json.dumps(asdict(self), separators=(",", ":")))
