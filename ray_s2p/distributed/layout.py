"""Which group, data shard and direction seeds each replica serves in a step.

- direction mode: every replica is its own group (own seeds, the same batch);
- data mode: one group (shared seeds, the batch split into shards);
- hybrid: ``cluster.groups`` groups, each splitting the batch among its members.

With a replica range the replicas present are dealt out again after a loss or a join: groups keep their
count (so a step's directions do not change in data and hybrid mode), the first ``replicas % groups`` groups
get one member more, and each group cuts the step's batch among its members (config.py checks every cut is
even).

Direction j of step k has seed ``mix_seed(run_seed, k, j)`` with j = group * q + i,
so a run is a pure function of its config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..zo.noise import mix_seed
from .messages import ProbeReply


@dataclass
class Layout:
    """Which group, shard and directions each replica serves."""

    replicas: int
    groups: int
    directions: int  # q per group

    @classmethod
    def from_config(cls, config: RunConfig) -> "Layout":
        return cls(config.cluster.replicas, config.direction_groups, config.optimizer.directions)

    @property
    def shards(self) -> int:
        """Members of the smallest group (of every group when the replicas divide evenly)."""
        return self.replicas // self.groups

    def shards_of(self, group: int) -> int:
        """The members of ``group``, the data shards its batch is cut into."""
        return self.shards + (1 if group < self.replicas % self.groups else 0)

    def first(self, group: int) -> int:
        """The position of ``group``'s first member (the owner of its directions in the ledger)."""
        return group * self.shards + min(group, self.replicas % self.groups)

    def group(self, replica: int) -> int:
        big = self.replicas % self.groups  # the first ``big`` groups have shards + 1 members
        if replica < big * (self.shards + 1):
            return replica // (self.shards + 1)
        return big + (replica - big * (self.shards + 1)) // self.shards

    def shard(self, replica: int) -> int:
        return replica - self.first(self.group(replica))

    def seeds(self, run_seed: int, step: int, group: int) -> tuple[int, ...]:
        q = self.directions
        return tuple(mix_seed(run_seed, step, group * q + i) for i in range(q))

    def group_losses(self, replies: list[ProbeReply], width: int) -> list[list[float]]:
        """Each direction's ``width`` losses averaged over the shards of its group (data-parallel reading), in
        direction order (group by group)."""
        out: list[list[float]] = []
        for g in range(self.groups):
            members = [replies[r] for r in range(len(replies)) if self.group(r) == g]
            for i in range(self.directions):
                out.append([sum(m.losses[i][j] for m in members) / len(members) for j in range(width)])
        return out
