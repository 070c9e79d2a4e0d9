"""The replica engine: one model replica, its probes and its updates, with no Ray in it.

A ``ReplicaEngine`` is what a Ray replica actor holds, and what the driver
runs in-process when ``cluster.use_ray`` is false. It builds its own task and
model from the config, so nothing but messages crosses the process boundary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import FIRST_ORDER, ConfigError, RunConfig
from ..data.batching import shard_batch_size
from ..storage_fs import StoragePath, file_size, location
from ..tasks.base import EvalTotals, Task
from ..zo.directions import DirectionSpace
from ..zo.environment import numerics_environment
from ..zo.probes import Prober, read_losses
from ..zo.space import build_space as space_from_config
from ..zo.update import apply_update
from .checkpoint import CheckpointError, CheckpointRecord, load_checkpoint, read_checkpoint, save_checkpoint
from .digest import model_digest
from .layout import Layout
from .messages import ProbeReply, ProbeRequest, Update
from .replica_files import checkpoint_tensors, export_final, load_tensors
from .storage import probe_storage

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision.weights


def build_space(model: torch.nn.Module, names: list[str], config: RunConfig) -> DirectionSpace:
    """The direction space of a model's trainable parameters under the run's perturbation settings."""
    return space_from_config(model, names, config.perturbation, seed=config.seed,
                             weight_decay_exempt=config.optimizer.weight_decay_exempt,
                             threads=config.cluster.noise_threads)


def use_shard_batch_size(task: Task, config: RunConfig, shards: int | None = None) -> None:
    """Set the examples per train batch of a data shard: the task's ``train_batch_size`` (None: ``task.batch_size``).

    Weak scaling and one-shard layouts (direction mode, first-order runs) set None, so they draw exactly the
    batches they always drew; strong sets ``task.batch_size / shards`` (``shards``: the config's shards per group,
    or those of the step's request when a replica range re-cut the batch). Eval batches keep ``task.batch_size``.

    Raises:
        ConfigError: strong scaling splits the batch, and the task has no ``train_batch_size``.
    """
    size = shard_batch_size(config.task.batch_size, Layout.from_config(config).shards if shards is None else shards,
                            config.cluster.batch_scaling)
    share = None if size == config.task.batch_size else size
    if hasattr(task, "train_batch_size"):
        task.train_batch_size = share  # not in the Task protocol: user tasks may lack it
    elif share is not None:
        raise ConfigError(f"config field 'cluster.batch_scaling': strong needs {size} examples per data shard, and "
                          f"the task {type(task).__name__} (task.name {config.task.name!r}) has no train_batch_size "
                          f"attribute. Fix: use weak, or give the task a train_batch_size (None: task.batch_size) "
                          f"that its train_batch draws")


class ReplicaEngine:
    """Holds one replica's task, model and direction space.

    Args:
        config: the run config.
        replica: this replica's index (only used in replies).
        task: an already built task (tests); built from the config if None.
    """

    def __init__(self, config: RunConfig, replica: int = 0, task: Task | None = None) -> None:
        if config.cluster.threads_per_replica:
            torch.set_num_threads(config.cluster.threads_per_replica)
        from ..tasks import build_task  # local import: tasks pull in transformers

        self.config = config
        self.replica = replica
        self.task = task if task is not None else build_task(config.task, config.seed)
        use_shard_batch_size(self.task, config)
        self.model = self.task.build_model()
        self.model.eval()  # no dropout: the loss must be a function of the parameters
        weights = WEIGHT_DTYPES[config.precision.weights]
        if weights != torch.float32:
            # Half-precision weights: 2 bytes per parameter and no fp32 master copy; updates are
            # rounded back stochastically (zo/rounding.py). Cast before the direction space is built,
            # so that it holds the cast parameters.
            self.model.to(weights)
        self.device = _replica_device(config, self.model)
        if self.device.type != "cpu" and not _spans_devices(self.model):
            self.model.to(self.device)
        self.trainable = self.task.trainable_names(self.model)
        self.space = build_space(self.model, self.trainable, config)
        self.prober = Prober(self.model, self.space, config.perturbation.mechanism)
        self.applied_step = 0
        self._first_order: torch.optim.Optimizer | None = None
        if config.optimizer.name in FIRST_ORDER:
            self._first_order = make_first_order(config, self.space.params, self.space.decay_exempt)

    # ------------------------------------------------------------------ steps
    def apply(self, update: Update | None) -> None:
        """Apply a step's update exactly once (a re-sent update for an applied step is ignored)."""
        if update is None or update.step <= self.applied_step:
            return
        if update.step != self.applied_step + 1:
            raise RuntimeError(f"replica {self.replica} is at step {self.applied_step} but got the update "
                               f"of step {update.step}; an update was lost")
        apply_update(self.space, update.pairs, update.param_scale, update.step, update.sign_step)
        self.applied_step = update.step

    def probe(self, request: ProbeRequest) -> ProbeReply:
        """Apply the pending update, then evaluate every (seed, radius) on this step's shard."""
        start = time.perf_counter()
        self.apply(request.update)
        if self.config.cluster.batch_scaling == "strong":  # the group's batch, cut among the shards of this step
            use_shard_batch_size(self.task, self.config, request.num_shards)
        batch = to_device(self.task.train_batch(request.step, request.shard, request.num_shards), self.device)
        with torch.no_grad():
            prepared = self.task.prepare(self.model, batch, self.trainable)

        def loss_fn() -> torch.Tensor:
            return self.task.loss(self.model, prepared)

        rows = []
        for i, seed in enumerate(request.seeds):
            radii = request.per_seed_radii[i] if request.per_seed_radii is not None else request.radii
            rows.append([self.prober.loss(loss_fn, seed, r, request.step) for r in radii])
        losses = read_losses(rows)  # the step's losses leave the device together: one host sync per step
        return ProbeReply(request.step, self.replica, tuple(losses), self.applied_step, time.perf_counter() - start)

    def first_order_step(self, step: int, shard: int = 0, num_shards: int = 1) -> float:
        """One backprop step of the first-order reference (SGD / AdamW); returns the batch loss."""
        assert self._first_order is not None, "not a first-order run"
        batch = to_device(self.task.train_batch(step, shard, num_shards), self.device)
        with torch.no_grad():  # the frozen prefix needs no graph (feature reuse applies here too)
            batch = self.task.prepare(self.model, batch, self.trainable)
        self._first_order.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.task.loss(self.model, batch)
            loss.backward()
        self._first_order.step()
        self.applied_step = step
        return float(loss.detach())

    # ------------------------------------------------------------- inspection
    def digest(self) -> str:
        return model_digest(self.model)

    def evaluate(self, shard: int = 0, num_shards: int = 1) -> EvalTotals:
        """Forward-only evaluation of this shard of the held-out set."""
        totals = EvalTotals()
        with torch.no_grad():
            for batch in self.task.eval_batches(shard, num_shards):
                totals = totals.merge(self.task.eval_totals(self.model, to_device(batch, self.device)))
        return totals

    def save_checkpoint(self, step: int, directory: str | StoragePath, rule_state: dict[str, Any],
                        meta: dict[str, Any], keep: int = 2) -> CheckpointRecord:
        """Write this replica's checkpoint of ``step`` into ``directory`` (the run's checkpoints/), atomically.

        Args:
            step: the step; the replica must have applied exactly its update.
            directory: the run's ``checkpoints/`` directory, as the driver names it (a path or URI, or a
                ``StoragePath`` when the run's storage is a given pyarrow FileSystem).
            rule_state: the driver's rule state (small JSON).
            meta: the driver's state.json keys (config fingerprint, ledger digest, data position).
            keep: how many checkpoints to keep.

        Returns:
            The step, path, parameter digest, and the tensor file's sha256 and size (never the tensors).

        Raises:
            RuntimeError: the replica is not at ``step``.
        """
        if self.applied_step != step:
            raise RuntimeError(f"replica {self.replica} is at step {self.applied_step}, asked to save step {step}")
        digest = self.digest()
        path = save_checkpoint(location(directory), step, checkpoint_tensors(self.space, self._first_order), rule_state,
                               dict(meta, digest=digest), keep=keep)
        saved = read_checkpoint(path, verify_tensors=False)
        return CheckpointRecord(step, str(path), digest, str(saved.meta["params_sha256"]),
                                file_size(path / "params.safetensors"))

    def verify_checkpoint(self, path: str | StoragePath, fingerprint: str | None = None) -> str | None:
        """Check one checkpoint (files, sha256 of the tensor file, config fingerprint) where this replica
        reads it; returns the error message, or None when it verifies."""
        try:
            read_checkpoint(location(path), fingerprint)
        except CheckpointError as exc:
            return str(exc)
        return None

    def load_checkpoint(self, path: str | StoragePath, fingerprint: str | None = None) -> int:
        """Load a checkpoint from the run directory into this replica (restore, recovery, resync).

        The tensor file's sha256 and the config fingerprint are verified before loading, and the
        parameter digest after it.

        Returns:
            The checkpoint's step (now this replica's applied step).

        Raises:
            CheckpointError: the checkpoint fails a check.
        """
        ckpt, tensors = load_checkpoint(location(path), fingerprint)
        self.load_trainable(tensors, ckpt.step)
        del tensors  # the loaded file's memory goes before the digest pass
        expected = ckpt.meta.get("digest")
        if expected is not None and self.digest() != expected:
            raise CheckpointError(f"checkpoint {location(path).name!r}: the loaded parameters' digest differs from "
                                  f"the one saved with them (replica {self.replica}). Fix: resume from another "
                                  f"checkpoint")
        return ckpt.step

    def load_trainable(self, tensors: dict[str, torch.Tensor], applied_step: int) -> None:
        """Overwrite the selected parameters (checkpoint restore or resync), and a first-order optimizer's state
        when the checkpoint has it (replica_files.py); this replica is then at ``applied_step``."""
        load_tensors(self.space, self._first_order, tensors)
        self.applied_step = applied_step

    def replay(self, updates: list[tuple[Any, ...]]) -> None:
        """Apply ledger updates (step, pairs, param_scale[, sign_step]) after ``applied_step``, no forward passes.

        ``ledger.updates_by_step`` gives the four-field form; a missing sign_step is a linear update.
        """
        for step, pairs, scale, *sign in updates:
            if step > self.applied_step:
                self.apply(Update(step, tuple(pairs), scale, sign[0] if sign else None))

    def save_final(self, directory: str | Path) -> None:
        self.task.save_final(self.model, Path(directory))

    def write_final(self, run_dir: str | StoragePath) -> dict[str, int]:
        """Write ``save_final``'s output to ``run_dir/final``, atomically (replica_files.py ``export_final``);
        returns relative file name -> size in bytes."""
        return export_final(self.save_final, run_dir)

    def check_storage(self, run_dir: str | StoragePath, token: str) -> dict[str, Any]:
        """Whether this replica reads the driver's run directory and can write there (storage.py)."""
        return probe_storage(run_dir, token, self.replica)

    def info(self) -> dict[str, Any]:
        """What the driver learns once a replica is up: sizes, its applied step and its numerics environment."""
        return {"replica": self.replica, "trainable_parameters": self.space.dim,
                "total_parameters": sum(p.numel() for p in self.model.parameters()),
                "applied_step": self.applied_step, "environment": self.environment()}

    def environment(self) -> dict[str, Any]:
        """Device, kernels and torch build of this replica's arithmetic (zo/environment.py)."""
        return numerics_environment(self.device, self.config.perturbation.distribution, self.config.precision.weights,
                                    self.config.perturbation.noise)


def _replica_device(config: RunConfig, model: torch.nn.Module) -> torch.device:
    """cuda when the replica reserved a GPU and one is visible, else where the model already is."""
    if config.cluster.gpus_per_replica > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _spans_devices(model: torch.nn.Module) -> bool:
    # A model placed with an accelerate device_map keeps its placement.
    return len({p.device for p in model.parameters()}) > 1 or getattr(model, "hf_device_map", None) is not None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (dict/list/tuple, nested) to ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device) if batch.device != device else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_first_order(config: RunConfig, params: list[torch.nn.Parameter],
                     exempt: tuple[bool, ...] = ()) -> torch.optim.Optimizer:
    """torch.optim SGD or AdamW over the selected parameters (the backprop reference).

    Args:
        config: the run config (optimizer name, lr, weight_decay).
        params: the selected parameters.
        exempt: one flag per parameter, True where weight decay must not apply
            (``optimizer.weight_decay_exempt``, as for the zeroth-order rules); empty: all decay.
    """
    opt = config.optimizer
    flags = exempt or (False,) * len(params)
    decayed = [p for p, e in zip(params, flags) if not e]
    spared = [p for p, e in zip(params, flags) if e]
    # Two parameter groups, the usual AdamW recipe: decay where it regularises, none on biases and norms.
    groups = [g for g in ({"params": decayed, "weight_decay": opt.weight_decay},
                          {"params": spared, "weight_decay": 0.0}) if g["params"]]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr)
    return torch.optim.AdamW(groups, lr=opt.lr)
