"""ZO-signSGD (Liu, Chen, Chen and Hong, ICLR 2019): the coordinate-wise sign of a two-point estimate.

    g_hat   = (1 / q) sum_j gamma_j z_j,   gamma_j = (f(x + rho z_j) - f(x - rho z_j)) / (2 rho)
    x_{k+1} = (1 - lr_k wd) x_k - lr_k sign(g_hat)          (sign taken per coordinate)

Every coordinate moves by exactly lr_k (or not at all where g_hat is 0), whatever the
size of the estimate; that is the difference from ``zo_sign`` (ZO-Bench's
-lr sign(gamma_j) z_j, which scales whole directions and equals S2P option 1 with the
sign trick). A coordinate-wise sign is not a sum of ``c_j z_j``, so the decision
carries ``sign_step = lr_k`` and coefficients ``c_j = gamma_j / q_valid``: every
replica (and replay) regenerates the step's directions, forms g_hat = sum_j c_j z_j
chunk by chunk in float32 and applies ``-lr_k sign(g_hat)`` (``update.apply_update``).

Reconstructed: Liu et al. estimate with forward differences f(x + mu u) - f(x) and
directions on the unit sphere scaled by d; the scale cancels in the sign, and the
central difference is used here as for every two-point rule of the harness (same
two forward passes per direction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from ..schedules import Schedule
from ..transforms import finite_difference, weight_decay_scale
from .base import RuleState, StatelessTwoPoint, StepDecision, all_finite, average_decision, loss_rows
from .scaling import NO_SCALING, StepScaling


@dataclass(frozen=True)
class ZoSignSgdRule(StatelessTwoPoint):
    """ZO-signSGD: probes (rho, -rho); c_j = gamma_j / q_valid, sign_step = s(Q) lr_k (see the module docstring).

    The step scaling multiplies the per-coordinate step (and the weight decay), not the coefficients: they
    are the estimate whose sign is taken, and a scale cannot change a sign.
    """

    name: str
    rho: float
    lr: Schedule
    weight_decay: float = 0.0
    scaling: StepScaling = NO_SCALING

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        rows = loss_rows(losses, 2, "f(x+rho z), f(x-rho z)")
        gammas = tuple(finite_difference(r[0], r[1], self.rho) for r in rows)
        valid = [all_finite(r) and g is not None for r, g in zip(rows, gammas)]
        lr_k = self.scaling.factor(len(rows)) * self.lr(step)
        # The q-average makes g_hat the mean estimate; it cannot change a sign, but it keeps the
        # ledger's coefficients the estimate itself (comparable across q).
        decision = average_decision(list(gammas), valid, gammas, [lr_k] * len(rows), None,
                                    weight_decay_scale(lr_k, self.weight_decay))
        if not any(valid):  # nothing to take the sign of: nothing moves (param_scale is 1 already)
            return decision, {}
        return dataclasses.replace(decision, sign_step=lr_k), {}


def zo_signsgd(lr: Schedule, rho: float, weight_decay: float = 0.0,
               scaling: StepScaling = NO_SCALING) -> ZoSignSgdRule:
    """ZO-signSGD (Liu et al. 2019): x <- (1 - s lr_k wd) x - s lr_k sign(mean_j gamma_j z_j), s = s(Q)."""
    return ZoSignSgdRule("zo_signsgd", rho, lr, weight_decay, scaling)
