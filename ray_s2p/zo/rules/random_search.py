"""Basic random search / ARS (Mania et al. 2018, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..schedules import Schedule
from ..transforms import finite_difference, std, weight_decay_scale
from .base import RuleState, StatelessTwoPoint, StepDecision, average_decision, loss_rows
from .scaling import NO_SCALING, StepScaling


@dataclass(frozen=True)
class RandomSearchRule(StatelessTwoPoint):
    """Basic random search / ARS V1-t (Mania et al. 2018, Algorithm 1), for a loss to minimise.

    Probes (rho, -rho) = (nu, -nu). Keeps the ``top_b`` finite directions with the
    smallest min(f+, f-) (all if None; ties by direction index), and
    ``c_i = -lr_k / (b sigma_R) * (f+_i - f-_i)`` with sigma_R the population std
    of the 2b kept losses (1.0 if it is 0). The 1/b is this rule's average, so no
    further division by q; the step scaling s(Q) multiplies it, with Q every direction
    probed (not b). step_sizes are |c_i| before s(Q); sigma reports sigma_R.
    """

    name: str
    rho: float
    lr: Schedule
    top_b: Optional[int] = None
    weight_decay: float = 0.0
    scaling: StepScaling = NO_SCALING

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        rows = loss_rows(losses, 2, "f(x+rho z), f(x-rho z)")
        gammas = [finite_difference(r[0], r[1], self.rho) for r in rows]
        valid = [g is not None for g in gammas]
        candidates = [i for i, ok in enumerate(valid) if ok]
        b = min(self.top_b or len(candidates), len(candidates))
        kept = sorted(candidates, key=lambda i: (min(rows[i]), i))[:b]
        sigma_r = None
        raw: list[Optional[float]] = [None] * len(rows)
        if kept:
            sigma_r = std([f for i in kept for f in rows[i]]) or 1.0
            for i in kept:
                raw[i] = -self.lr(step) / (b * sigma_r) * (rows[i][0] - rows[i][1])
        steps = [None if c is None else abs(c) for c in raw]
        s = self.scaling.factor(len(rows))
        scale_x = weight_decay_scale(s * self.lr(step), self.weight_decay)
        return average_decision(raw, valid, gammas, steps, sigma_r, scale_x, denominator=1, scale=s), {}


def random_search(lr: Schedule, rho: float, top_b: Optional[int] = None,
                  weight_decay: float = 0.0, scaling: StepScaling = NO_SCALING) -> RandomSearchRule:
    """Basic random search / ARS (Mania et al. 2018): the best b directions, scaled by 1 / sigma_R."""
    if top_b is not None and top_b < 1:
        raise ValueError(f"random search top_b must be >= 1 or None, got {top_b}")
    return RandomSearchRule("random_search", rho, lr, top_b, weight_decay, scaling)
