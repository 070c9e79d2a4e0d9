"""The ``cluster`` section of a run config: how many replicas, in which mode, on which resources, and how the
driver waits for them (docs/config.md, section cluster)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .config_parse import one_of, require

Mode = Literal["direction", "data", "hybrid"]
BatchScaling = Literal["weak", "strong"]
OnMismatch = Literal["resync", "abort"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
MODES: tuple[str, ...] = get_args(Mode)
ON_MISMATCH: tuple[str, ...] = get_args(OnMismatch)
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
# Data and hybrid mode: whether task.batch_size is each shard's batch (weak scaling, the effective batch
# grows with the shards) or the group's batch split among its shards (strong scaling).
BATCH_SCALINGS: tuple[str, ...] = get_args(BatchScaling)
# Calls that read or write a whole model (checkpoint save, verify and load, evaluation, the final export) get
# at least this long before the driver gives a replica up, however short the step timeout is.
MODEL_IO_MIN_S = 600.0


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas and their resources."""

    replicas: int = 2
    mode: Mode = "direction"         # direction, data, hybrid
    batch_scaling: BatchScaling = "weak"  # data/hybrid: weak (task.batch_size per shard) or strong (per group, split)
    groups: int = 1                  # hybrid: number of direction groups (replicas split evenly)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    memory_per_replica_gb: float = 0.0  # Ray's memory resource per replica (0: none reserved)
    threads_per_replica: int | None = None
    noise_threads: int = 0           # noise jobs run at once (CPU); 0: torch's thread count
    use_ray: bool = True             # false: replicas run in-process (tests, debugging)
    address: str | None = None
    step_timeout_s: float = 300.0
    startup_timeout_s: float = 120.0
    digest_every: int = 50
    on_mismatch: OnMismatch = "resync"  # resync or abort
    max_replica_failures: int = 20
    placement_strategy: PlacementStrategy = "PACK"
    min_replicas: int = 0            # go on with this many or more when replicas are lost (0: every one is needed)
    replace_timeout_s: float = 60.0  # with min_replicas: how long a lost replica's replacement may take to start

    def __post_init__(self) -> None:
        require(self.replicas >= 1, "cluster.replicas", f"got {self.replicas}", "use 1 or more")
        require(self.mode in MODES, "cluster.mode", f"got {self.mode!r}", f"use {one_of(MODES)}")
        require(self.batch_scaling in BATCH_SCALINGS, "cluster.batch_scaling", f"got {self.batch_scaling!r}",
                 "use weak (each data shard draws task.batch_size examples) or strong (task.batch_size is "
                 "split among a group's shards)")
        require(self.groups >= 1 and self.replicas % self.groups == 0, "cluster.groups",
                 f"{self.groups} does not divide replicas={self.replicas}", "pick groups dividing cluster.replicas")
        require(self.noise_threads >= 0, "cluster.noise_threads", f"got {self.noise_threads}",
                 "use 0 (as many as torch's threads) or a positive count")
        require(self.cpus_per_replica >= 0, "cluster.cpus_per_replica", f"got {self.cpus_per_replica}", "use >= 0")
        require(self.gpus_per_replica >= 0, "cluster.gpus_per_replica", f"got {self.gpus_per_replica}", "use >= 0")
        require(self.memory_per_replica_gb >= 0, "cluster.memory_per_replica_gb", "negative", "use >= 0 (GiB)")
        require(self.step_timeout_s > 0, "cluster.step_timeout_s", f"got {self.step_timeout_s}", "use > 0 seconds")
        require(self.startup_timeout_s > 0, "cluster.startup_timeout_s", f"got {self.startup_timeout_s}", "use > 0")
        require(self.digest_every >= 0, "cluster.digest_every", f"got {self.digest_every}", "use 0 (end only) or more")
        require(self.on_mismatch in ON_MISMATCH, "cluster.on_mismatch", f"got {self.on_mismatch!r}",
                 f"use {one_of(ON_MISMATCH)}")
        require(self.placement_strategy in PLACEMENT_STRATEGIES, "cluster.placement_strategy",
                 f"got {self.placement_strategy!r}", f"use {one_of(PLACEMENT_STRATEGIES)}")
        require(0 <= self.min_replicas <= self.replicas, "cluster.min_replicas",
                 f"got {self.min_replicas} with replicas={self.replicas}",
                 "use 0 (every replica is needed) or a count from 1 to cluster.replicas")
        require(not self.elastic or self.mode == "direction" or self.batch_scaling == "strong",
                 "cluster.batch_scaling", f"a replica range ({self.min_replicas}-{self.replicas}) in {self.mode} mode "
                 "cuts each step's batch among the replicas present, which weak scaling (task.batch_size per "
                 "replica) cannot do", "use cluster.batch_scaling strong, or cluster.min_replicas 0")
        require(not self.elastic or self.mode != "hybrid" or self.min_replicas >= self.groups, "cluster.min_replicas",
                 f"got {self.min_replicas} with groups={self.groups}: every group needs a replica",
                 f"use cluster.min_replicas {self.groups} or more")
        require(self.replace_timeout_s > 0, "cluster.replace_timeout_s", f"got {self.replace_timeout_s}",
                 "use > 0 seconds")

    @property
    def elastic(self) -> bool:
        """True when the run goes on with fewer replicas than ``replicas`` (down to ``min_replicas``)."""
        return 0 < self.min_replicas < self.replicas

    @property
    def model_io_timeout_s(self) -> float:
        """Timeout of a call that writes, evaluates or exports the model: step_timeout_s, 10 minutes at least."""
        return max(MODEL_IO_MIN_S, self.step_timeout_s)

    @property
    def model_load_timeout_s(self) -> float:
        """Timeout of a call that reads a checkpoint in: startup_timeout_s, 10 minutes at least."""
        return max(MODEL_IO_MIN_S, self.startup_timeout_s)
