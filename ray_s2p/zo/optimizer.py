"""A plain single-process optimizer for ordinary PyTorch loops.

    opt = ZerothOrderOptimizer(model, optimizer_config(name="vs2p", eta=1.0, rho=1e-3), seed=0)
    for batch in loader:
        loss = opt.step(lambda: loss_fn(model(batch.x), batch.y))

The closure returns the loss on the *current* parameters; the optimizer calls it
once per probe (2 per direction for two-point rules) and never calls backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..config import FIRST_ORDER, ConfigError, OptimizerConfig, PerturbationConfig
from .noise import mix_seed
from .probes import Prober, read_losses
from .rules import StepDecision, build_rule
from .space import build_space
from .update import apply_update

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
        perturbation: how directions are drawn and probes applied, the trainer's ``perturbation`` section
            (default ``PerturbationConfig()``: the trainer's defaults, so both draw the same noise).
        noise_threads: ``cluster.noise_threads`` (0: torch's thread count on a CPU; speed only).
        ledger_path: if given, every step's rows go to this ledger.parquet (flushed by ``flush``).
        **perturbation_fields: single ``PerturbationConfig`` fields over ``perturbation``, e.g.
            ``distribution="lowrank", rank=4`` or ``mechanism="swap"``.

    Raises:
        ConfigError: a field that ``PerturbationConfig`` does not have, or a bad value (named).
    """

    def __init__(self, model: torch.nn.Module, config: OptimizerConfig, *, seed: int = 0, total_steps: int = 1000,
                 names: Sequence[str] | None = None, perturbation: PerturbationConfig | None = None,
                 noise_threads: int = 0, ledger_path: str | Path | None = None, **perturbation_fields: Any) -> None:
        if config.name in FIRST_ORDER:
            raise ValueError("optimizer.name: sgd/adamw are first-order; use torch.optim directly in a plain loop")
        known = {f.name for f in dataclasses.fields(PerturbationConfig)}
        unknown = sorted(set(perturbation_fields) - known)
        if unknown:
            raise ConfigError(f"ZerothOrderOptimizer: unknown perturbation field {unknown[0]!r}. "
                              f"Fix: use one of {', '.join(sorted(known))}")
        self.perturbation = dataclasses.replace(perturbation or PerturbationConfig(), **perturbation_fields)
        self.model = model
        self.config = config
        self.seed = seed
        self.space = build_space(model, names, self.perturbation, seed=seed,
                                 weight_decay_exempt=config.weight_decay_exempt, threads=noise_threads)
        self.prober = Prober(model, self.space, self.perturbation.mechanism)
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
            # Each round's losses leave the device together (one host sync), as in the trainer's replicas.
            losses = [list(row) for row in read_losses([[self.prober.loss(closure, s, r, k) for r in radii]
                                                        for s in seeds])]
            follow = self.rule.followup(losses, self.state, k)
            if follow is not None:
                more = read_losses([[self.prober.loss(closure, s, r, k) for r in extra]
                                    for s, extra in zip(seeds, follow)])
                losses = [row + list(extra) for row, extra in zip(losses, more)]
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
