"""The driver: one round trip per step, the rule state, the ledger, checkpoints, recovery.

One step, in the order ``Driver.run`` calls the phases (each a method below):

1. probe round (``_probe_round``): every replica gets a ``ProbeRequest`` (messages.py)
   and answers with a ``ProbeReply`` of loss scalars (engine.py ``ReplicaEngine.probe``,
   run by replica.py's pools);
2. decide (``_decide``): the step rule (zo/rules/) turns the losses into (seed,
   coefficient) pairs; they become ledger rows (zo/ledger.py) and the pending update;
3. apply (``_apply``): replicas apply the pending update, at the latest with the next
   step's request, earlier when a later phase needs the current parameters;
4. verify (``_verify``): every ``cluster.digest_every`` steps the replicas' digests must agree;
5. evaluate (``_evaluate``): held-out metrics every ``eval_every`` steps;
6. checkpoint (``_checkpoint``): the ledger is flushed, then replica 0 writes its parameters
   into the run directory itself (engine.py ``save_checkpoint``) with the rule state and ledger
   digest the driver hands it (checkpoint.py); the metrics are flushed (run_dir.py).

A replica that dies or hangs in any phase, 1 and 3-6 and the final export alike, is replaced,
caught up from checkpoint + ledger and asked again for its part of that phase (healing.py). A
first-order reference has no ledger: its replica's failure stops the run with the resume to use.

Tensors never pass through the driver: replica 0 writes checkpoints and ``final/``,
replicas load checkpoints from the run directory themselves, and the driver keeps
only step numbers, digests, the rule state and paths. Before step 1 every replica
must see the run directory (storage.py).

Per step k the driver sends every replica (step, seeds, shard, the pending
update of step k-1) and waits once for the loss scalars. It averages each
direction's losses over the data shards of its group (layout.py), feeds the rule,
and keeps the resulting (seed, coefficient) pairs as the pending update.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from ..config import FIRST_ORDER, FIRST_ORDER_PASSES, ConfigError, RunConfig
from ..storage_fs import Location, StoragePath, for_replica, location
from ..tasks.metrics import eval_metrics
from ..zo.environment import agreed, settle
from ..zo.ledger import Ledger, ledger_rows
from ..zo.rules import build_rule
from .checkpoint import Checkpoint, checkpoint_path, config_fingerprint, latest_checkpoint
from .console import ProgressBar, replicas_up
from .healing import Healer, ReplicasDropped
from .layout import Layout
from .membership import admit_waiting, redone_on_drop, start_pool, steps_at_size
from .messages import ProbeRequest, Update
from .pool import PoolFactory, ReplicaPool
from .replica import ReplicaFailure
from .run_dir import RunDirectory
from .run_state import RunState, StepOutcome, TrainingError, TrainResult
from .storage import check_storage

__all__ = ["Driver", "TrainingError", "train"]


class Driver:
    """Runs one training run in ``run_dir`` (fresh or resumed).

    Args:
        config: the run config.
        run_dir: the run directory (created if needed): a local path, a URI (file://, s3://, gs://) or a
            ``StoragePath`` of storage_fs.py.
        resume: continue from the newest valid checkpoint in ``run_dir``.
        report: optional callback(metrics dict, checkpoint dir or None), e.g. for Ray Tune.
        log: where messages go.
        pool: builds the replicas from the config (default: ``LocalPool``, or ``RayPool`` with
            ``cluster.use_ray``; Ray is initialised first either way): a pool of your own, e.g. one that
            records or injects faults.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path | StoragePath, *, resume: bool = False,
                 overwrite: bool = False, report: Callable[[dict[str, Any], Path | None], None] | None = None,
                 log: Callable[[str], None] = print, verbose: bool = False, pool: PoolFactory | None = None) -> None:
        self.config = config
        self.pool_factory = pool
        self.report = report
        self.log = log
        self.verbose = verbose  # replicas' library output on the console (else RUN_DIR/logs/replica-N.log)
        self.layout = Layout.from_config(config)
        self.first_order = config.optimizer.name in FIRST_ORDER
        if self.first_order and config.cluster.replicas != 1:
            raise ConfigError("optimizer.name: the first-order references (sgd, adamw) run on one replica. "
                             "Fix: --set cluster.replicas=1")
        # The rule scales every step by the Q it evaluates (zo/rules/scaling.py); Q here only checks the decay.
        self.rule = None if self.first_order else build_rule(config.optimizer, config.steps,
                                                             config.directions_per_step)
        # Last: every check above runs before the run directory is touched.
        self.rd = RunDirectory(run_dir, config, resume=resume, overwrite=overwrite)
        self.fingerprint = config_fingerprint(config.to_dict())
        self.healer = Healer(config, self.fingerprint, log)
        self.bad_streak = 0
        self.skipped_total = 0
        self.joins = 0

    # -------------------------------------------------------------- the run
    def run(self) -> TrainResult:
        """Train from the start, or from the newest checkpoint of a resumed run, to ``config.steps``."""
        begun = time.perf_counter()
        try:
            pool = start_pool(self.config, self.pool_factory, self.verbose, self.log,
                              nothing_written=self.rd.created or self.rd.resumed)
        except BaseException:
            self.rd.discard()  # bad model path, data or resources: leave nothing half-written
            raise
        self.pool = pool  # exposed for monitoring and fault-injection tests
        try:
            try:
                check_storage(pool, self.rd.path, timeout=self.config.cluster.startup_timeout_s)
            except BaseException:
                self.rd.discard()  # replicas cannot reach the run directory: nothing was trained
                raise
            infos = pool.call("info", [()] * pool.size)
            state = self._open(pool, infos)
            if self.rd.resumed:
                self.rd.confirm_resume()  # checkpoint and ledger verified: only now may the resume write
            self.rd.open_sinks(self.log)  # TensorBoard, MLflow, W&B as configured
            # Replica logs go into a local or mounted run directory; at a URI they stay in node-local files.
            logs = self.rd.path / "logs" if isinstance(self.rd.path, Path) and self.config.cluster.use_ray \
                and not self.verbose else None
            if logs is not None:
                pool.attach_logs(logs.resolve())
            self.log(replicas_up(infos, pool.places(), state.ledger.environment, logs))
            state.started = time.perf_counter()  # wall time counts from the replicas being up, as before a resume
            state.startup_seconds = state.started - begun  # Ray, the replicas, their models and data
            self._start(pool, state)
            progress = ProgressBar(self.config.steps, state.start_step, self.config.progress)
            for step in range(state.start_step + 1, self.config.steps + 1):
                if self.config.cluster.elastic:  # replicas started since the last step join now, caught up
                    self.joins += admit_waiting(pool, self.healer, state, self.rd.path)
                outcome = (self._first_order_step(pool, state, step) if self.first_order
                           else self._zo_step(pool, state, step))
                self._record(state, step, outcome, pool.size)
                self._between_steps(pool, state, step)
                progress.update(step, outcome.loss, state.last_eval, state.last_eval_step)
            progress.close()
            return self._finish(pool, state)
        finally:
            self.rd.close_sinks("FAILED")  # nothing left to close after a finished run's summary
            pool.shutdown()

    def _open(self, pool: ReplicaPool, infos: list[dict[str, Any]]) -> RunState:
        """The state to start from: step 0, or a resumed run's newest checkpoint and its ledger."""
        # Replica 0 checks the tensor file's sha256 where it reads it; the driver reads only state.json.
        ckpt = latest_checkpoint(self.rd.checkpoints, self.fingerprint, lambda path: pool.call(
            "verify_checkpoint", [(for_replica(path), self.fingerprint)], replicas=[0],
            timeout=self.config.cluster.model_load_timeout_s)[0], log=self.log) if self.rd.resumed else None
        start_step = ckpt.step if ckpt is not None else 0
        rule_state = ckpt.rule_state.get("rule") if ckpt is not None else None
        if rule_state is None and self.rule is not None:
            rule_state = self.rule.init()
        ledger = Ledger.open(self.rd.ledger_path, upto_step=start_step)
        # Replicas on different devices or torch builds could never stay bitwise identical: refused here.
        replicas_env = agreed([info["environment"] for info in infos])
        ledger.environment, note = settle(ledger.environment, replicas_env, start_step)
        if note:
            self.log(note)
        if ckpt is not None and ledger.digest(start_step) != ckpt.meta.get("ledger_digest"):
            raise TrainingError("ledger.parquet does not match the checkpoint (rows were changed or belong to "
                                "another run). Fix: restore the run's own ledger")
        if self.rd.metrics_problem is not None:  # torn metrics.parquet: the ledger is the truth for steps and passes
            self.log(self.rd.rebuild_train_rows(ledger.rows, self.layout.shards, start_step, ckpt.meta if ckpt else {},
                                                FIRST_ORDER_PASSES if self.first_order else None))
        self.rd.truncate_metrics(start_step)
        # The checkpoint of step s stores parameters *with* update s applied, so nothing is pending.
        return RunState(start_step=start_step, rule_state=rule_state, ledger=ledger, ckpt=ckpt,
                        forward_passes=self.rd.previous_forward_passes(start_step),
                        wall_before=self.rd.previous_wall_seconds() if self.rd.resumed else 0.0)

    def _start(self, pool: ReplicaPool, state: RunState) -> None:
        """Restore a resumed run's replicas, and evaluate the starting point (once per run)."""
        initial = self.rd.initial_eval()
        if initial is None:
            # A fresh run, or a resume whose metrics were lost: the new replicas still hold the step-0
            # parameters, so this is the starting point's evaluation even before the checkpoint is restored.
            initial = self._evaluate(pool, state)
            self.rd.record_eval(0, initial, 0, 0.0)
        if state.ckpt is not None:
            try:
                self.healer.restore(pool, list(range(pool.size)), state.ckpt, state.ledger, state.start_step)
            except ReplicaFailure as failure:
                try:
                    self.healer.recover(pool, failure.failed, state,
                                        f"restoring the checkpoint failed: {failure.reason}")
                except ReplicasDropped:
                    pass  # the others restored the checkpoint; the run goes on with them
        state.initial_eval = state.last_eval = initial

    def _record(self, state: RunState, step: int, outcome: StepOutcome, replicas: int) -> None:
        state.bytes_sent += outcome.sent
        state.bytes_received += outcome.received
        state.forward_passes += outcome.passes
        state.wall = state.elapsed()
        self.rd.record_step(step, outcome.loss, state.forward_passes, state.wall, outcome.sent, outcome.received,
                            outcome.skipped, replicas)

    def _between_steps(self, pool: ReplicaPool, state: RunState, step: int) -> None:
        """The periodic phases after a step: verify, evaluate, checkpoint, flush, report."""
        cfg = self.config
        if cfg.cluster.digest_every and step % cfg.cluster.digest_every == 0:
            self._verify(pool, state)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            state.last_eval, state.last_eval_step = self._evaluate(pool, state), step
            self.rd.record_eval(step, state.last_eval, state.forward_passes, state.wall)
        saved = None
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            self._checkpoint(pool, state, step)
            saved = ckpt_dir(self.rd.checkpoints, step)
        if step % cfg.log_every == 0 or saved is not None:
            state.ledger.flush()
            self.rd.flush_metrics()
        if self.report is not None and step != cfg.steps and (saved is not None or step % cfg.log_every == 0):
            self.report(self.rd.report_row(step), saved)

    def _finish(self, pool: ReplicaPool, state: RunState) -> TrainResult:
        """Final evaluation and digest check, summary.json, and the final model from replica 0."""
        cfg = self.config
        final_eval = self._evaluate(pool, state)
        elapsed = state.elapsed()
        self.rd.record_eval(cfg.steps, final_eval, state.forward_passes, elapsed)
        digests = self._verify(pool, state)
        state.ledger.flush()
        self.rd.flush_metrics()
        steps_run = max(1, cfg.steps - state.start_step)
        self._write_final(pool, state)
        summary = self.rd.write_summary(
            final_digest=digests[0], steps_completed=cfg.steps, wall_seconds=elapsed,
            startup_seconds=state.startup_seconds,
            bytes_sent_per_step=state.bytes_sent / steps_run, bytes_received_per_step=state.bytes_received / steps_run,
            replicas=pool.size, initial_metrics=state.initial_eval, final_metrics=final_eval,
            forward_passes=state.forward_passes, environment=state.ledger.environment, nodes=pool.places(),
            replica_failures=self.healer.failures, replica_drops=self.healer.drops, replica_joins=self.joins,
            steps_at_size=steps_at_size(state.ledger.rows, self.layout.directions) if cfg.cluster.elastic else None,
            recovery_seconds=self.healer.recoveries,
            skipped_directions=self.skipped_total, resumed_from=state.start_step if self.rd.resumed else None,
            traffic=pool.traffic.summary())
        if self.report is not None:
            self.report(self.rd.report_row(cfg.steps), ckpt_dir(self.rd.checkpoints, cfg.steps))
        return TrainResult(self.rd.path, digests[0], cfg.steps, summary)

    @redone_on_drop
    def _write_final(self, pool: ReplicaPool, state: RunState) -> None:
        # Replica 0 writes final/ into the run directory itself and answers with file names and sizes.
        self.healer.call(pool, state, "write_final", [(for_replica(self.rd.path),)], replicas=[0],
                         timeout=self.config.cluster.model_io_timeout_s)

    # ------------------------------------------------ phase 1-2: probe, decide
    @redone_on_drop
    def _zo_step(self, pool: ReplicaPool, state: RunState, step: int) -> StepOutcome:
        """Probe round (and follow-up round, if the rule has one), then the rule's decision (redone whole with
        the replicas left when some are dropped: membership.py)."""
        assert self.rule is not None
        if self.layout.replicas != pool.size:  # a replica range lost or gained replicas: deal them out again
            groups = pool.size if self.config.cluster.mode == "direction" else self.layout.groups
            self.layout = Layout(pool.size, groups, self.layout.directions)
        lay = self.layout
        radii = tuple(self.rule.radii(state.rule_state, step))
        group_seeds = [lay.seeds(self.config.seed, step, g) for g in range(lay.groups)]
        requests = [ProbeRequest(step, group_seeds[lay.group(r)], radii, lay.shard(r), lay.shards_of(lay.group(r)),
                                 state.pending) for r in range(pool.size)]
        losses, sent, received, passes = self._probe_round(pool, state, step, requests, len(radii))
        follow = self.rule.followup(losses, state.rule_state, step)
        if follow is not None:
            # Follow-up round (S2P options 2/4 without the sign trick): radii depend on each gamma.
            q = lay.directions
            requests2 = [ProbeRequest(step, group_seeds[lay.group(r)], (), lay.shard(r), lay.shards_of(lay.group(r)),
                                      None,
                                      tuple(tuple(x) for x in follow[lay.group(r) * q:(lay.group(r) + 1) * q]))
                         for r in range(pool.size)]
            extra, sent2, received2, passes2 = self._probe_round(pool, state, step, requests2, len(follow[0]))
            losses = [list(a) + list(b) for a, b in zip(losses, extra)]
            sent, received, passes = sent + sent2, received + received2, passes + passes2
        seeds = [s for g in group_seeds for s in g]
        owners = [pool.slots[lay.first(g)] for g in range(lay.groups) for _ in range(lay.directions)]
        # Data shards behind each direction's losses (recorded in data and hybrid mode: the ledger says how many
        # replicas a step used there too).
        shards = ([lay.shards_of(g) for g in range(lay.groups) for _ in range(lay.directions)]
                  if self.config.cluster.mode != "direction" else None)
        loss, skipped = self._decide(state, step, seeds, radii, losses, owners, shards)
        return StepOutcome(loss, sent, received, passes, skipped)

    def _probe_round(self, pool: ReplicaPool, state: RunState, step: int, requests: list[ProbeRequest],
                     width: int) -> tuple[list[list[float]], int, int, int]:
        """One fan-out of probe requests: (losses per direction, bytes sent, bytes received, forward passes)."""
        # A dead replica is replaced, caught up to step - 1 and sent its request again (healing.py).
        replies = self.healer.call(pool, state, "probe", [(q,) for q in requests])
        losses = self.layout.group_losses(replies, width)
        sent = sum(q.json_bytes() for q in requests)
        received = sum(r.json_bytes() for r in replies)
        passes = sum(len(r.losses) * width for r in replies)
        return losses, sent, received, passes

    def _decide(self, state: RunState, step: int, seeds: list[int], radii: tuple[float, ...],
                losses: list[list[float]], owners: list[int], shards: list[int] | None = None) -> tuple[float, int]:
        """The rule's update from the losses: ledger rows (``owners``: the replica of each direction), the
        pending update; (mean loss, skipped directions)."""
        assert self.rule is not None
        decision, state.rule_state = self.rule.update(losses, state.rule_state, step)
        state.ledger.extend(ledger_rows(step, seeds, radii, losses, decision, owners, shards))
        skipped_bad = sum(1 for row in losses if not all(math.isfinite(v) for v in row))
        self.skipped_total += skipped_bad
        self.bad_streak = self.bad_streak + 1 if skipped_bad == len(losses) else 0
        if self.bad_streak >= self.config.optimizer.max_bad_losses:
            raise TrainingError(f"{self.bad_streak} steps in a row had only non-finite losses (last step {step}). "
                                f"Fix: lower optimizer.lr/eta or rho, or check the data")
        state.pending = Update(step, tuple(zip(seeds, (float(c) for c in decision.coefficients))),
                               decision.param_scale, decision.sign_step)
        finite = [v for row in losses for v in row[:2] if math.isfinite(v)]
        return (sum(finite) / len(finite) if finite else float("nan")), skipped_bad

    def _first_order_step(self, pool: ReplicaPool, state: RunState, step: int) -> StepOutcome:
        """The backprop reference: one replica, nothing on the wire but the loss. A failure stops the run
        (``Healer.recover``: nothing to catch a replacement up from)."""
        loss = self.healer.call(pool, state, "first_order_step", [(step, 0, 1)])[0]
        return StepOutcome(loss, 0, 0, FIRST_ORDER_PASSES, 0)

    # ------------------------------------- phases 3-6: apply, verify, evaluate, checkpoint
    def _apply(self, pool: ReplicaPool, state: RunState) -> None:
        """Apply the pending update now (replicas ignore an update they already applied)."""
        if state.pending is not None:
            self.healer.call(pool, state, "apply", [(state.pending,)] * pool.size)

    @redone_on_drop
    def _verify(self, pool: ReplicaPool, state: RunState) -> list[str]:
        """Every replica's digest must equal replica 0's; heal (resync) or abort as configured."""
        self._apply(pool, state)
        digests = self.healer.call(pool, state, "digest", [()] * pool.size)
        if len(set(digests)) > 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            if self.config.cluster.on_mismatch == "abort":
                raise TrainingError(f"replica digests differ (replicas {bad} disagree with replica 0). "
                                    f"Set cluster.on_mismatch=resync to heal instead")
            self.log(f"replica digests differ at replicas {bad}; resyncing them from checkpoint + ledger")
            try:
                self.healer.replace_and_catch_up(pool, bad, state)
            except ReplicaFailure as failure:
                self.healer.recover(pool, failure.failed, state, f"a resynced replica failed: {failure.reason}")
            digests = self.healer.call(pool, state, "digest", [()] * pool.size)
            if len(set(digests)) > 1:
                raise TrainingError("replica digests still differ after a resync")
            self.rd.count_resync()
        return digests

    @redone_on_drop
    def _evaluate(self, pool: ReplicaPool, state: RunState) -> dict[str, float]:
        """Held-out metrics of the current parameters, the eval set split among the replicas."""
        self._apply(pool, state)
        if self.config.task.eval_size == 0:
            return {}
        totals = self.healer.call(pool, state, "evaluate", [(r, pool.size) for r in range(pool.size)],
                                  timeout=self.config.cluster.model_io_timeout_s)
        return eval_metrics(totals)

    @redone_on_drop
    def _checkpoint(self, pool: ReplicaPool, state: RunState, step: int) -> None:
        """Replica 0 writes its trainable tensors with the rule state and the ledger digest of ``step``;
        the driver sends and receives only those scalars, digests and the path."""
        self._apply(pool, state)
        meta = {"config_fingerprint": self.fingerprint, "ledger_digest": state.ledger.digest(step),
                "data_position": {"step": step},
                # Not in the ledger: what a resume with a torn metrics.parquet continues the wall time from.
                "wall_seconds": state.wall, "forward_passes": state.forward_passes}
        rule = {"rule": state.rule_state}
        # Ledger first: a crash between the two writes then leaves an older checkpoint that still matches.
        state.ledger.flush()
        # Replica 0 dying while it writes is replaced at `step` and writes again; a half-written .ckpt.*
        # directory is never renamed into place.
        record = self.healer.call(pool, state, "save_checkpoint",
                                  [(step, for_replica(self.rd.checkpoints), rule, meta)], replicas=[0],
                                  timeout=self.config.cluster.model_io_timeout_s)[0]
        state.ckpt = Checkpoint(step, rule, dict(meta, digest=record.digest, params_sha256=record.params_sha256),
                                checkpoint_path(self.rd.checkpoints, step))


def ckpt_dir(root: Location, step: int) -> Location | None:
    path = checkpoint_path(root, step)
    return path if path.is_dir() else None


def train(config: RunConfig, run_dir: str | Path | StoragePath, *, resume: bool = False, overwrite: bool = False,
          report: Callable[[dict[str, Any], Path | None], None] | None = None,
          log: Callable[[str], None] = print, verbose: bool = False, filesystem: Any = None,
          pool: PoolFactory | None = None) -> TrainResult:
    """Train (or resume) a run; see ``Driver``. ``filesystem``: a pyarrow FileSystem that ``run_dir`` is a path
    in (as Ray's ``RunConfig(storage_filesystem=...)``); None: a local path, or a URI resolved by pyarrow.fs."""
    return Driver(config, location(run_dir, filesystem), resume=resume, overwrite=overwrite, report=report, log=log,
                  verbose=verbose, pool=pool).run()
