"""A plain single-process optimizer for ordinary PyTorch loops.

    opt = ZerothOrderOptimizer(model, optimizer_config(name="vs2p", eta=1.0, rho=1e-3), seed=0)
    for batch in loader:
        loss = opt.step(lambda: loss_fn(model(batch.x), batch.y))

The closure returns the loss on the *current* parameters; the optimizer calls it
once per probe (2 per direction for two-point rules) and never calls backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..config import FIRST_ORDER, OptimizerConfig
from .directions import DirectionSpace, NoiseTable, apply_update, mix_seed, select_parameters
from .probes import Prober
from .rules import StepDecision, build_rule
from .weight_decay import decay_exempt

if TYPE_CHECKING:
    from .ledger import Ledger


def optimizer_config(**fields: Any) -> OptimizerConfig:
    """An ``OptimizerConfig`` from keyword arguments (validated)."""
    return OptimizerConfig(**fields)


@dataclass(frozen=True)
class StepRecord:
    """What one step did: the loss at x (mean of the probes) and the rule's decision."""

    step: int
    loss: float
    seeds: tuple[int, ...]
    losses: tuple[tuple[float, ...], ...]
    decision: StepDecision


class ZerothOrderOptimizer:
    """S2P / VS2P / MeZO / ... on a model in one process, with an optional ledger.

    A bf16 or fp16 model stays in its dtype: probes perturb fp32 copies, and each update is
    accumulated in fp32 and rounded back with seeded stochastic rounding (``apply_update``
    with this step and ``seed``), so updates far below half an ulp are not lost.

    Args:
        model: the model (its ``requires_grad`` parameters are trained unless ``names`` is given).
        config: the optimizer settings (see docs/config.md, section optimizer).
        seed: run seed; the direction seed of (step, j) is ``mix_seed(seed, step, j)``.
        total_steps: horizon for decay schedules.
        names: parameter names to train (default: all with requires_grad).
        distribution: gaussian, rademacher, sphere, table or lowrank.
        rank: r of the low-rank directions (distribution="lowrank").
        lowrank_interval: lazy V: V redrawn every this many steps (distribution="lowrank").
        mechanism: hooks, swap or naive (see ray_s2p.zo.probes).
        ledger_path: if given, every step's rows go to this ledger.parquet (flushed by ``flush``).
    """

    def __init__(self, model: torch.nn.Module, config: OptimizerConfig, *, seed: int = 0, total_steps: int = 1000,
                 names: Sequence[str] | None = None, distribution: str = "gaussian", mechanism: str = "hooks",
                 table_size: int = 1 << 22, rank: int = 2, lowrank_interval: int = 1,
                 ledger_path: str | Path | None = None) -> None:
        if config.name in FIRST_ORDER:
            raise ValueError("optimizer.name: sgd/adamw are first-order; use torch.optim directly in a plain loop")
        self.model = model
        self.config = config
        self.seed = seed
        sel_names, params = select_parameters(model, names)
        table = NoiseTable(table_size, device=params[0].device) if distribution == "table" else None
        self.space = DirectionSpace(sel_names, params, distribution, table, rank=rank,
                                    lowrank_interval=lowrank_interval, run_seed=seed,
                                    decay_exempt=decay_exempt(model, sel_names, config.weight_decay_exempt))
        self.prober = Prober(model, self.space, mechanism)
        # One process evaluates all of a step's q directions: the step is scaled for Q = q (zo/rules/scaling.py).
        self.rule = build_rule(config, total_steps, config.directions)
        self.state = self.rule.init()
        self.step_count = 0
        self.ledger: Ledger | None = None
        if ledger_path is not None:
            # The distributed trainer's ledger format (ledger.py here, no Ray in it); imported only when
            # asked for, so the math needs no pyarrow.
            from .ledger import Ledger
            self.ledger = Ledger(ledger_path)

    def step(self, closure: Callable[[], torch.Tensor]) -> StepRecord:
        """One optimizer step (forward passes only).

        The model is in eval mode while the closure runs (no dropout, batch-norm running statistics
        used, not updated) and every module gets its own mode back afterwards.

        Args:
            closure: returns the loss of the model on the current batch.

        Returns:
            The step's record; ``loss`` is the mean of the finite probe losses.
        """
        self.step_count += 1
        k = self.step_count
        seeds = tuple(mix_seed(self.seed, k, j) for j in range(self.config.directions))
        radii = self.rule.radii(self.state, k)
        # Probes run in eval mode: with dropout (or batch-norm statistics) active, f(x + rho z) and
        # f(x - rho z) would differ for a reason other than the direction, and the estimate would be noise.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            losses = [[self.prober.evaluate(closure, s, r, k) for r in radii] for s in seeds]
            follow = self.rule.followup(losses, self.state, k)
            if follow is not None:
                losses = [row + [self.prober.evaluate(closure, s, r, k) for r in extra]
                          for row, s, extra in zip(losses, seeds, follow)]
        finally:
            for module, training in modes:  # each module back to its own mode (a frozen norm may be in eval)
                module.training = training
        decision, self.state = self.rule.update(losses, self.state, k)
        apply_update(self.space, list(zip(seeds, decision.coefficients)), decision.param_scale, k, decision.sign_step)
        if self.ledger is not None:
            from .ledger import ledger_rows
            self.ledger.extend(ledger_rows(k, seeds, radii, losses, decision))
        finite = [v for row in losses for v in row if v == v and abs(v) != float("inf")]
        mean = sum(finite) / len(finite) if finite else float("nan")
        return StepRecord(k, mean, seeds, tuple(tuple(r) for r in losses), decision)

    def flush(self) -> None:
        """Write the ledger file (atomically)."""
        if self.ledger is not None:
            self.ledger.flush()
