"""The driver: one round trip per step, the rule state, the ledger, checkpoints, recovery.

Per step k the driver sends every replica (step, seeds, shard, the pending
update of step k-1) and waits once for the loss scalars. It averages each
direction's losses over the data shards of its group, feeds the rule, and
keeps the resulting (seed, coefficient) pairs as the pending update, which the
replicas apply at the start of step k+1. Layout of replicas:

- direction mode: every replica is its own group (own seeds, the same batch);
- data mode: one group (shared seeds, the batch split into shards);
- hybrid: ``cluster.groups`` groups, each splitting the batch among its members.

Direction j of step k has seed ``mix_seed(run_seed, k, j)`` with
j = group * q + i, so a run is a pure function of its config.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .checkpoint import Checkpoint, config_fingerprint, latest_checkpoint, save_checkpoint
from .config import RunConfig
from .ledger import Ledger, updates_by_step
from .messages import ProbeRequest, Update
from .perturbation import mix_seed
from .replica import LocalPool, RayPool, ReplicaFailure
from .run_dir import RunDirectory, aggregate_eval
from .step_rules import build_rule
from .zo_optimizer import ledger_rows

FIRST_ORDER = ("sgd", "adamw")


class TrainingError(RuntimeError):
    """The run cannot continue (too many failures, non-finite losses, replica mismatch)."""


# A first-order step is one forward and one backward (about two forwards): 3 forward-pass
# equivalents, the unit in which metrics and equal-budget comparisons count its cost.
FIRST_ORDER_PASSES = 3


@dataclass
class Layout:
    """Which group, shard and directions each replica serves."""

    replicas: int
    groups: int
    directions: int  # q per group

    @classmethod
    def from_config(cls, config: RunConfig) -> "Layout":
        c = config.cluster
        groups = {"direction": c.replicas, "data": 1, "hybrid": c.groups}[c.mode]
        return cls(c.replicas, groups, config.optimizer.directions)

    @property
    def shards(self) -> int:
        return self.replicas // self.groups

    def group(self, replica: int) -> int:
        return replica // self.shards

    def shard(self, replica: int) -> int:
        return replica % self.shards

    def seeds(self, run_seed: int, step: int, group: int) -> tuple[int, ...]:
        q = self.directions
        return tuple(mix_seed(run_seed, step, group * q + i) for i in range(q))


@dataclass
class TrainResult:
    """What ``train`` returns (also written to summary.json)."""

    run_dir: Path
    final_digest: str
    steps_completed: int
    summary: dict[str, Any] = field(default_factory=dict)


class Driver:
    """Runs one training run in ``run_dir`` (fresh or resumed).

    Args:
        config: the run config.
        run_dir: the run directory (created if needed).
        resume: continue from the newest valid checkpoint in ``run_dir``.
        report: optional callback(metrics dict, checkpoint dir or None), e.g. for Ray Tune.
        log: where messages go.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 report: Callable[[dict[str, Any], Path | None], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.config = config
        self.rd = RunDirectory(Path(run_dir), config, resume=resume, overwrite=overwrite)
        self.report = report
        self.log = log
        self.layout = Layout.from_config(config)
        self.first_order = config.optimizer.name in FIRST_ORDER
        if self.first_order and config.cluster.replicas != 1:
            raise ValueError("optimizer.name: the first-order references (sgd, adamw) run on one replica. "
                             "Fix: --set cluster.replicas=1")
        self.rule = None if self.first_order else build_rule(config.optimizer, config.steps)
        self.fingerprint = config_fingerprint(config.to_dict())
        self.failures = 0
        self.recoveries: list[float] = []
        self.bad_streak = 0
        self.skipped_total = 0

    # ------------------------------------------------------------------ setup
    def _start_pool(self) -> LocalPool | RayPool:
        if not self.config.cluster.use_ray:
            return LocalPool(self.config)
        import ray
        if not ray.is_initialized():
            address = self.config.cluster.address
            ray.init(address=address, include_dashboard=False, log_to_driver=True) if address else ray.init(
                include_dashboard=False, log_to_driver=True)
        return RayPool(self.config, log=self.log)

    def _restore(self, pool: LocalPool | RayPool, replicas: list[int], ckpt: Checkpoint | None,
                 ledger: Ledger, upto: int) -> None:
        """Bring replicas to step ``upto``: checkpoint tensors, then ledger replay (no forwards)."""
        if ckpt is not None and ckpt.step > 0:
            if isinstance(pool, RayPool):
                import ray
                ref = ray.put(ckpt.tensors)
                pool.call("load_trainable", [(ref, ckpt.step)] * len(replicas), replicas=replicas,
                          timeout=self.config.cluster.startup_timeout_s)
            else:
                pool.call("load_trainable", [(ckpt.tensors, ckpt.step)] * len(replicas), replicas=replicas)
        start = ckpt.step if ckpt is not None else 0
        updates = [u for u in updates_by_step(ledger.rows) if start < u[0] <= upto]
        if updates:
            pool.call("replay", [(updates,)] * len(replicas), replicas=replicas,
                      timeout=self.config.cluster.startup_timeout_s)

    # ------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        cfg = self.config
        ckpt = latest_checkpoint(self.rd.checkpoints, self.fingerprint) if self.rd.resumed else None
        start_step = ckpt.step if ckpt is not None else 0
        rule_state = ckpt.rule_state.get("rule") if ckpt is not None else None
        if rule_state is None and self.rule is not None:
            rule_state = self.rule.init()
        ledger = Ledger.open(self.rd.ledger_path, upto_step=start_step)
        if ckpt is not None and ledger.digest(start_step) != ckpt.meta.get("ledger_digest"):
            raise TrainingError("ledger.parquet does not match the checkpoint (rows were changed or belong to "
                                "another run). Fix: restore the run's own ledger")
        self.rd.truncate_metrics(start_step)
        try:
            pool = self._start_pool()
        except BaseException:
            self.rd.discard()  # bad model path, data or resources: leave nothing half-written
            raise
        self.pool = pool  # exposed for monitoring and fault-injection tests
        t0 = time.perf_counter()
        wall_before = self.rd.previous_wall_seconds() if self.rd.resumed else 0.0
        bytes_sent = bytes_recv = 0
        forward_passes = self.rd.previous_forward_passes(start_step)
        try:
            if ckpt is not None:
                self._restore(pool, list(range(pool.size)), ckpt, ledger, start_step)
            initial_eval = self.rd.initial_eval() or self._evaluate(pool, None)
            if not self.rd.resumed:
                self.rd.record_eval(0, initial_eval, forward_passes, 0.0)
            pending = self._pending_from_ledger(ledger, start_step)
            progress = self.rd.progress(start_step)
            last_eval: dict[str, float] = initial_eval
            for step in range(start_step + 1, cfg.steps + 1):
                if self.first_order:
                    loss, sent, recv = self._first_order_step(pool, step)
                    passes, skipped = FIRST_ORDER_PASSES, 0
                else:
                    loss, pending, rule_state, sent, recv, passes, skipped = self._zo_step(
                        pool, step, pending, rule_state, ledger, ckpt)
                bytes_sent += sent
                bytes_recv += recv
                forward_passes += passes
                elapsed = wall_before + time.perf_counter() - t0
                self.rd.record_step(step, loss, forward_passes, elapsed, sent, recv, skipped)
                if cfg.cluster.digest_every and step % cfg.cluster.digest_every == 0:
                    self._check_digests(pool, pending, ckpt, ledger)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    last_eval = self._evaluate(pool, pending)
                    self.rd.record_eval(step, last_eval, forward_passes, elapsed)
                saved = None
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                    ckpt = self._checkpoint(pool, step, pending, rule_state, ledger)
                    saved = ckpt_dir(self.rd.checkpoints, step)
                if step % cfg.log_every == 0 or saved is not None:
                    ledger.flush()
                    self.rd.flush_metrics()
                if self.report is not None and step != cfg.steps and (saved is not None or step % cfg.log_every == 0):
                    self.report(self.rd.report_row(step), saved)
                progress.update(step, loss, last_eval)
            progress.close()
            final_eval = self._evaluate(pool, pending)
            elapsed = wall_before + time.perf_counter() - t0
            self.rd.record_eval(cfg.steps, final_eval, forward_passes, elapsed)
            digests = self._check_digests(pool, pending, ckpt, ledger)
            ledger.flush()
            self.rd.flush_metrics()
            steps_run = cfg.steps - start_step
            summary = self.rd.write_summary(
                final_digest=digests[0], steps_completed=cfg.steps, wall_seconds=elapsed,
                bytes_sent_per_step=bytes_sent / max(1, steps_run), bytes_received_per_step=bytes_recv / max(1, steps_run),
                replicas=pool.size, initial_metrics=initial_eval, final_metrics=final_eval,
                forward_passes=forward_passes, replica_failures=self.failures, recovery_seconds=self.recoveries,
                skipped_directions=self.skipped_total, resumed_from=start_step if self.rd.resumed else None)
            # Replica 0 may live on another node: it sends the saved files' bytes (once, at the end).
            files = pool.call("export_final", [()], replicas=[0],
                              timeout=max(600.0, self.config.cluster.step_timeout_s))[0]
            self.rd.write_final(files)
            if self.report is not None:
                self.report(self.rd.report_row(cfg.steps), ckpt_dir(self.rd.checkpoints, cfg.steps))
            return TrainResult(self.rd.path, digests[0], cfg.steps, summary)
        finally:
            pool.shutdown()

    # ---------------------------------------------------------------- steps
    def _pending_from_ledger(self, ledger: Ledger, step: int) -> Update | None:
        # The checkpoint of step s stores parameters *with* update s applied, so nothing is pending.
        return None

    def _zo_step(self, pool, step, pending, rule_state, ledger, ckpt):
        assert self.rule is not None
        lay = self.layout
        radii = tuple(self.rule.radii(rule_state, step))
        group_seeds = [lay.seeds(self.config.seed, step, g) for g in range(lay.groups)]
        requests = [ProbeRequest(step, group_seeds[lay.group(r)], radii, lay.shard(r), lay.shards, pending)
                    for r in range(pool.size)]
        replies = self._round(pool, requests, ledger, ckpt, step)
        losses = self._group_losses(replies, len(radii))
        sent = sum(q.wire_bytes() for q in requests)
        recv = sum(r.wire_bytes() for r in replies)
        passes = sum(len(r.losses) * len(radii) for r in replies)
        follow = self.rule.followup(losses, rule_state, step)
        if follow is not None:
            # Follow-up round (S2P options 2/4 without the sign trick): radii depend on each gamma.
            q = lay.directions
            requests2 = [ProbeRequest(step, group_seeds[lay.group(r)], (), lay.shard(r), lay.shards, None,
                                      tuple(tuple(x) for x in follow[lay.group(r) * q:(lay.group(r) + 1) * q]))
                         for r in range(pool.size)]
            replies2 = self._round(pool, requests2, ledger, ckpt, step)
            extra = self._group_losses(replies2, len(follow[0]))
            losses = [list(a) + list(b) for a, b in zip(losses, extra)]
            sent += sum(q.wire_bytes() for q in requests2)
            recv += sum(r.wire_bytes() for r in replies2)
            passes += sum(len(r.losses) * len(follow[0]) for r in replies2)
        decision, rule_state = self.rule.update(losses, rule_state, step)
        seeds = [s for g in group_seeds for s in g]
        owners = [g * lay.shards for g in range(lay.groups) for _ in range(lay.directions)]
        ledger.extend(ledger_rows(step, seeds, radii, losses, decision, owners))
        skipped_bad = sum(1 for row in losses if not all(math.isfinite(v) for v in row))
        self.skipped_total += skipped_bad
        self.bad_streak = self.bad_streak + 1 if skipped_bad == len(losses) else 0
        if self.bad_streak >= self.config.optimizer.max_bad_losses:
            raise TrainingError(f"{self.bad_streak} steps in a row had only non-finite losses (last step {step}). "
                                f"Fix: lower optimizer.lr/eta or rho, or check the data")
        finite = [v for row in losses for v in row[:2] if math.isfinite(v)]
        loss = sum(finite) / len(finite) if finite else float("nan")
        update = Update(step, tuple(zip(seeds, (float(c) for c in decision.coefficients))), decision.param_scale)
        return loss, update, rule_state, sent, recv, passes, skipped_bad

    def _group_losses(self, replies, width: int) -> list[list[float]]:
        """Average each direction's losses over the shards of its group (data-parallel reading)."""
        lay = self.layout
        out: list[list[float]] = []
        for g in range(lay.groups):
            members = [replies[r] for r in range(len(replies)) if lay.group(r) == g]
            for i in range(lay.directions):
                out.append([sum(m.losses[i][j] for m in members) / len(members) for j in range(width)])
        return out

    def _round(self, pool, requests, ledger, ckpt, step):
        """One fan-out/wait; failed replicas are replaced, restored and re-asked (their work only)."""
        todo = list(range(pool.size))
        replies: list[Any] = [None] * pool.size
        while todo:
            try:
                got = pool.call("probe", [(requests[r],) for r in todo], replicas=todo)
                for r, reply in zip(todo, got):
                    replies[r] = reply
                todo = []
            except ReplicaFailure as failure:
                for r, reply in zip(todo, failure.results):
                    if reply is not None:
                        replies[r] = reply
                todo = list(failure.failed)
                self._recover(pool, todo, ledger, ckpt, step, failure.reason)
        return replies

    def _recover(self, pool, failed, ledger, ckpt, step, reason) -> None:
        self.failures += len(failed)
        if self.failures > self.config.cluster.max_replica_failures:
            raise TrainingError(f"{self.failures} replica failures exceed cluster.max_replica_failures="
                                f"{self.config.cluster.max_replica_failures}: {reason}")
        started = time.perf_counter()
        self.log(f"step {step}: {reason}; replacing replicas {failed}")
        for r in failed:
            pool.replace(r)
        # The ledger holds every step before this one: restore to step-1 (the re-sent request's pending
        # update, if any, is then recognised as applied). This also covers follow-up rounds, which
        # carry no update.
        self._restore(pool, failed, ckpt, ledger, step - 1)
        self.recoveries.append(time.perf_counter() - started)

    def _first_order_step(self, pool, step):
        got = pool.call("first_order_step", [(step, 0, 1)])
        return got[0], 0, 0

    # ------------------------------------------------------- digests & eval
    def _check_digests(self, pool, pending, ckpt, ledger) -> list[str]:
        if pending is not None:
            pool.call("apply", [(pending,)] * pool.size)
        digests = pool.call("digest", [()] * pool.size)
        if len(set(digests)) > 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            if self.config.cluster.on_mismatch == "abort":
                raise TrainingError(f"replica digests differ (replicas {bad} disagree with replica 0). "
                                    f"Set cluster.on_mismatch=resync to heal instead")
            self.log(f"replica digests differ at replicas {bad}; resyncing them from checkpoint + ledger")
            applied = pending.step if pending is not None else (ckpt.step if ckpt else 0)
            for r in bad:
                pool.replace(r)
            self._restore(pool, bad, ckpt, ledger, applied)
            digests = pool.call("digest", [()] * pool.size)
            if len(set(digests)) > 1:
                raise TrainingError("replica digests still differ after a resync")
            self.rd.count_resync()
        return digests

    def _evaluate(self, pool, pending) -> dict[str, float]:
        if pending is not None:
            pool.call("apply", [(pending,)] * pool.size)
        if self.config.task.eval_size == 0:
            return {}
        totals = pool.call("evaluate", [(r, pool.size) for r in range(pool.size)],
                           timeout=max(600.0, self.config.cluster.step_timeout_s))
        return aggregate_eval(totals)

    def _checkpoint(self, pool, step, pending, rule_state, ledger) -> Checkpoint:
        if pending is not None:
            pool.call("apply", [(pending,)] * pool.size)
        tensors = pool.call("trainable_state", [()], replicas=[0])[0]
        digest = pool.call("digest", [()], replicas=[0])[0]
        meta = {"config_fingerprint": self.fingerprint, "ledger_digest": ledger.digest(step),
                "digest": digest, "data_position": {"step": step}}
        # Ledger first: a crash between the two writes then leaves an older checkpoint that still matches.
        ledger.flush()
        save_checkpoint(self.rd.checkpoints, step, tensors, {"rule": rule_state}, meta)
        return Checkpoint(step, tensors, {"rule": rule_state}, meta)


def ckpt_dir(root: Path, step: int) -> Path | None:
    path = Path(root) / f"step_{step:08d}"
    return path if path.is_dir() else None


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          report: Callable[[dict[str, Any], Path | None], None] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) a run; see ``Driver``."""
    return Driver(config, run_dir, resume=resume, overwrite=overwrite, report=report, log=log).run()
